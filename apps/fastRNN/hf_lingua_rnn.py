"""apps/fastRNN's models as lingua's remote-code class `LinguaRNNForCausalLM` (lingua/hf/remote/modeling_lingua_rnn.py;
no transformers class runs minGRU, minLSTM or Hawk). Parameter names are ours under `model.`, the output projection
`lm_head.weight` (left out when tied); config.json carries the widths' own keys (lru_dim_multiplier, multiple_of,
ffn_dim_multiplier) so the args come back exactly. Built for the model's args class (`lingua_rnn_mapping(FastRNNArgs)`
in model.py), so this file and the model never import each other."""

from functools import partial

import torch

from lingua.errors import LinguaError
from lingua.hf.mapping import DTYPE_NAMES, HFMapping, full_tensor
from lingua.models.layers import ffn_hidden_dim


def hf_name(name: str) -> str:
    return "lm_head.weight" if name == "output.weight" else f"model.{name}"


def rnn_to_hf(state: dict, args) -> dict:
    return {hf_name(k): full_tensor(t).detach().contiguous() for k, t in state.items()
            if not (k == "output.weight" and args.weight_tying)}


def rnn_from_hf(hf_state: dict, args) -> dict:
    ours = {}
    for key, t in hf_state.items():
        if not (key == "lm_head.weight" or key.startswith("model.")):
            raise LinguaError(f"Hugging Face tensor '{key}' has no place in a lingua fastRNN model")
        ours["output.weight" if key == "lm_head.weight" else key.removeprefix("model.")] = t
    ours.setdefault("output.weight", ours.get("tok_embeddings.weight"))
    return ours


def rnn_config(args, bos_id=None, eos_id=None, dtype=torch.float32) -> dict:
    return {"architectures": ["LinguaRNNForCausalLM"], "model_type": "lingua_rnn",
            "auto_map": {"AutoConfig": "configuration_lingua.LinguaRNNConfig",
                         "AutoModelForCausalLM": "modeling_lingua_rnn.LinguaRNNForCausalLM"},
            "vocab_size": args.vocab_size, "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
            "intermediate_size": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
            "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier, "cell": args.cell,
            "lru_dim": int(args.lru_dim_multiplier * args.dim), "lru_dim_multiplier": args.lru_dim_multiplier,
            "num_heads": args.n_heads, "conv_size": args.conv_size, "rms_norm_eps": args.norm_eps,
            "max_position_embeddings": args.max_seqlen, "tie_word_embeddings": bool(args.weight_tying),
            "logit_softcap": args.logit_softcap, "initializer_range": args.init_base_std or args.dim**-0.5,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": False,
            "dtype": DTYPE_NAMES.get(dtype, "float32")}


def rnn_args_from_config(args_cls: type, cfg_path, cfg: dict):
    try:
        return args_cls(dim=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]),
                        vocab_size=int(cfg["vocab_size"]), cell=cfg["cell"],
                        lru_dim_multiplier=float(cfg["lru_dim_multiplier"]), n_heads=int(cfg["num_heads"]),
                        conv_size=int(cfg["conv_size"]), multiple_of=int(cfg["multiple_of"]),
                        ffn_dim_multiplier=cfg["ffn_dim_multiplier"], norm_eps=float(cfg["rms_norm_eps"]),
                        max_seqlen=int(cfg["max_position_embeddings"]),
                        weight_tying=bool(cfg["tie_word_embeddings"]), logit_softcap=cfg.get("logit_softcap"))
    except KeyError as e:
        raise LinguaError(f"{cfg_path}: missing {e.args[0]}") from None


def rnn_check_matches(hf_args, args, path) -> None:
    for key in ("dim", "n_layers", "vocab_size", "cell", "lru_dim_multiplier", "n_heads", "conv_size", "multiple_of",
                "ffn_dim_multiplier"):
        if getattr(hf_args, key) != getattr(args, key):
            raise LinguaError(f"Hugging Face model '{path}' has model.{key}={getattr(hf_args, key)} but this model "
                              f"has {getattr(args, key)}")


def lingua_rnn_mapping(args_cls: type) -> HFMapping:
    return HFMapping(architecture="LinguaRNNForCausalLM", model_types=("lingua_rnn",), config=rnn_config,
                     args_from_config=partial(rnn_args_from_config, args_cls), to_hf=rnn_to_hf, from_hf=rnn_from_hf,
                     check_matches=rnn_check_matches, remote_code=True)
