"""What every Hugging Face class of lingua's Transformer shares: parameter names, the RoPE layout, the common
config.json fields and reading them back. Each class is one mapping in its own file: hf_llama.py (LlamaForCausalLM),
hf_qwen3.py (Qwen3ForCausalLM, QK-norm), hf_arcee.py (ArceeForCausalLM, ReLU²) and hf_lingua.py (lingua's own
LinguaForCausalLM, remote code, every switch); lingua/models/transformer/spec.py lists them in that order.

The models compute the same function; only names and one layout differ:

- Names: `layers.{i}.attention.wq.weight` <-> `model.layers.{i}.self_attn.q_proj.weight`, and so on (`HF_LAYER_NAMES`;
  the MLP's by model.mlp: `MLP_NAMES`).
- RoPE: we rotate interleaved pairs (dims 2i, 2i+1 of each head share angle i, as Meta's Llama code does);
  transformers' `rotate_half` rotates the halves (dims i and i + head_dim/2 share angle i). Attention scores are
  q.k summed over a head's dims, so permuting the output rows of wq and wk the same way inside every head changes
  nothing but the layout: row 2i+j of a head (ours) becomes row j*head_dim/2 + i (theirs). wv, wo are untouched.
  lingua's remote-code class rotates halves too, so every class shares one file layout.
- Tied embeddings: `lm_head.weight` is omitted from the file and `tie_word_embeddings` is set, as transformers saves it.
"""

import logging
import re
from functools import partial
from typing import Callable, Optional

import torch

from lingua.errors import LinguaError
from lingua.hf.mapping import DTYPE_NAMES, HFMapping, full_tensor
from lingua.models.layers import ffn_hidden_dim
from lingua.models.transformer.model import TransformerArgs

logger = logging.getLogger(__name__)

# ours -> theirs, for the parameters of block i (prefixes `layers.{i}.` and `model.layers.{i}.` added around them)
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# the gated MLP's gate is gate_proj; a two-matrix MLP's input is up_proj (as Arcee and Nemotron name it)
MLP_NAMES = {"swiglu": {"feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
                        "feed_forward.w2.weight": "mlp.down_proj.weight"},
             "relu2": {"feed_forward.w1.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight"}}
QK_NORM_NAMES = {"attention.q_norm.weight": "self_attn.q_norm.weight",  # model.qk_norm: Qwen3's
                 "attention.k_norm.weight": "self_attn.k_norm.weight"}
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def hf_name(name: str, mlp: str = "swiglu") -> str:
    """Our parameter name -> the Hugging Face one (Llama's, and the others' where they have it)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    layer_names = {**HF_LAYER_NAMES, **MLP_NAMES[mlp], **QK_NORM_NAMES}
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
    if name in HF_NAMES:
        return HF_NAMES[name]
    raise LinguaError(f"parameter '{name}' has no Hugging Face Llama equivalent")


def _expected_names(args: TransformerArgs) -> list[str]:
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    per_layer = list(HF_LAYER_NAMES) + list(MLP_NAMES[args.mlp]) + (list(QK_NORM_NAMES) if args.qk_norm else [])
    return names + [f"layers.{i}.{k}" for i in range(args.n_layers) for k in per_layer]


# ---------------------------------------------------------------- the RoPE layout


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads * head_dim, dim): pairs (2i, 2i+1) of each head -> (i, i + head_dim/2)."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim).contiguous()


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_halves`."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim).contiguous()


def _relayout(name: str, w: torch.Tensor, args: TransformerArgs, to_hf: bool) -> torch.Tensor:
    """Permute what the RoPE layout touches: the rows of wq and wk, and the head_dim weights of the q/k norms (one
    head's worth of rows)."""
    n_heads, n_kv_heads, _ = args.heads
    heads = {"attention.wq.weight": n_heads, "attention.wk.weight": n_kv_heads,
             "attention.q_norm.weight": 1, "attention.k_norm.weight": 1}.get(name.split(".", 2)[-1])
    if heads is None:
        return w
    permute = interleaved_to_halves if to_hf else halves_to_interleaved
    return permute(w, heads) if w.dim() == 2 else permute(w[:, None], heads)[:, 0]


# ---------------------------------------------------------------- state dicts


def transformer_to_hf(model_state: dict, args: TransformerArgs) -> dict:
    """Our state dict (full tensors or DTensors) -> Hugging Face names and RoPE layout. Tied embeddings: no
    `lm_head.weight` (safetensors refuses two names for one storage). Tensors other than wq/wk may share memory
    with `model_state`."""
    expected = _expected_names(args)
    if args.weight_tying:
        expected.remove("output.weight")
    for name in expected:
        if name not in model_state:
            raise LinguaError(f"model state has no '{name}': it is not a {args.n_layers}-layer lingua Transformer")
    return {hf_name(name, args.mlp): _relayout(name, full_tensor(model_state[name]).detach(), args, to_hf=True)
            .contiguous() for name in expected}


def transformer_from_hf(hf_state: dict, args: TransformerArgs) -> dict:
    """Hugging Face tensors -> our names and RoPE layout (the exact inverse of `transformer_to_hf`).

    A checkpoint without `lm_head.weight` has tied embeddings: `output.weight` is then the embedding table."""
    theirs_to_ours = {hf_name(n, args.mlp): n for n in _expected_names(args)}
    ours = {}
    for key, w in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; we derive it from rope_theta
        if key not in theirs_to_ours:
            raise LinguaError(f"Hugging Face tensor '{key}' has no place in a {args.n_layers}-layer lingua Transformer")
        ours[theirs_to_ours[key]] = _relayout(theirs_to_ours[key], w, args, to_hf=False)
    if "output.weight" not in ours and "tok_embeddings.weight" in ours:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    for name in _expected_names(args):
        if name not in ours:
            raise LinguaError(f"Hugging Face checkpoint has no '{hf_name(name, args.mlp)}'")
    return ours


# ---------------------------------------------------------------- config.json


def base_config(args: TransformerArgs, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """The config.json fields every class shares (Llama's names), as transformers writes them; each mapping adds
    `architectures`, `model_type` and its own. RoPE theta is written both ways: `rope_parameters` (transformers >= 5)
    and `rope_theta` (4.x)."""
    n_heads, n_kv_heads, head_dim = args.heads
    return {
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu" if args.mlp == "swiglu" else "relu2",
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rope_theta)},
        "rope_theta": float(args.rope_theta),
        "max_position_embeddings": args.max_seqlen,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": bool(args.weight_tying),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_base_std or args.dim**-0.5,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),  # the name transformers 4.x reads
    }


def _ffn_args(dim: int, intermediate_size: int, mlp: str) -> tuple[Optional[float], int]:
    """(ffn_dim_multiplier, multiple_of) that make our `mlp` exactly `intermediate_size` wide."""
    for multiple_of in (256, 1024, 128, 64, 32, 16, 8):  # the defaults Llama configs use, when they fit
        if ffn_hidden_dim(dim, multiple_of, None, mlp) == intermediate_size:
            return None, multiple_of
    # Otherwise round up to intermediate_size itself, scaling down first if the default is wider: int(multiplier *
    # base) lands on intermediate_size or one below it, which rounds up to exactly intermediate_size.
    base = ffn_hidden_dim(dim, 1, None, mlp)
    multiplier = None if base <= intermediate_size else intermediate_size / base
    if ffn_hidden_dim(dim, intermediate_size, multiplier, mlp) != intermediate_size:
        raise LinguaError(f"cannot express intermediate_size={intermediate_size} for hidden_size={dim}")
    return multiplier, intermediate_size


def _check_plain(cfg_path, cfg: dict) -> dict:
    """Refuse what no lingua Transformer computes (sliding windows, RoPE scaling, partial rotary, biases); return
    the RoPE parameters."""
    if cfg.get("use_sliding_window"):
        raise LinguaError(f"{cfg_path}: use_sliding_window=true is not supported (lingua attends to every position)")
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if cfg.get("rope_scaling") or rope_type != "default":
        raise LinguaError(f"{cfg_path}: RoPE scaling ({cfg.get('rope_scaling') or rope}) is not supported")
    if cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LinguaError(f"{cfg_path}: partial_rotary_factor != 1 is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise LinguaError(f"{cfg_path}: {key}=true is not supported (lingua's linear layers have no bias)")
    return rope


def args_from_config(cfg_path, cfg: dict, mlp: str, qk_norm: bool, logit_softcap: Optional[float] = None,
                     args_cls: type = TransformerArgs) -> TransformerArgs:
    """Model args for a config.json of one of the transformer's classes (its MLP and switches given by the
    mapping), or one line saying why it cannot be represented."""
    rope = _check_plain(cfg_path, cfg)
    acts = {"swiglu": ("silu", "swish"), "relu2": ("relu2",)}[mlp]
    if cfg.get("hidden_act", acts[0]) not in acts:
        raise LinguaError(f"{cfg_path}: hidden_act '{cfg['hidden_act']}' is not supported (lingua's model.mlp={mlp} "
                          f"is {acts[0]})")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        multiplier, multiple_of = _ffn_args(dim, int(cfg["intermediate_size"]), mlp)
        return args_cls(
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            ffn_dim_multiplier=multiplier,
            multiple_of=multiple_of,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_seqlen=int(cfg.get("max_position_embeddings", 2048)),
            vocab_size=int(cfg["vocab_size"]),
            weight_tying=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=qk_norm,
            mlp=mlp,
            logit_softcap=logit_softcap,
        )
    except KeyError as e:
        raise LinguaError(f"{cfg_path}: missing {e.args[0]}") from None


def check_matches(hf_args: TransformerArgs, args: TransformerArgs, path) -> None:
    """Fail on a different shape or head layout (the RoPE permutation depends on it); warn on what only changes
    numerics (rope_theta, norm_eps, max_seqlen, the soft-cap), which a fine-tuning run may change on purpose."""
    theirs, ours = hf_args.heads, args.heads
    shape_keys = {"model.dim": (hf_args.dim, args.dim), "model.n_layers": (hf_args.n_layers, args.n_layers),
                  "model.qk_norm": (hf_args.qk_norm, args.qk_norm), "model.mlp": (hf_args.mlp, args.mlp),
                  "model.vocab_size": (hf_args.vocab_size, args.vocab_size),
                  "model.n_heads": (theirs[0], ours[0]), "model.n_kv_heads": (theirs[1], ours[1]),
                  "model.head_dim": (theirs[2], ours[2]),
                  "FFN width": (hf_args.ffn_dim, args.ffn_dim)}
    for key, (h, o) in shape_keys.items():
        if h != o:
            raise LinguaError(f"Hugging Face model '{path}' has {key}={h} but this model has {o}")
    for key in ("rope_theta", "norm_eps", "max_seqlen", "logit_softcap"):
        if getattr(hf_args, key) != getattr(args, key):
            logger.warning(f"Hugging Face model '{path}' has {key}={getattr(hf_args, key)}, this model "
                           f"model.{key}={getattr(args, key)}: its outputs will differ from the original's")


def differs(args: TransformerArgs, mlp: str, qk_norm: bool) -> Optional[str]:
    """What a native class with this MLP and QK-norm (and no logit soft-cap) cannot express of `args`, or None."""
    if args.mlp != mlp:
        return f"model.mlp={args.mlp} (its MLP is {mlp})"
    if args.qk_norm != qk_norm:
        return "model.qk_norm=true (it has no QK-norm)" if args.qk_norm else "model.qk_norm=false (it always has one)"
    if args.logit_softcap is not None:
        return "model.logit_softcap (it has no logit soft-cap)"
    return None


# ---------------------------------------------------------------- a native class


def native_config(args: TransformerArgs, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None, *, architecture: str, model_type: str,
                  extra: Optional[Callable[[TransformerArgs], dict]] = None) -> dict:
    return {"architectures": [architecture], "model_type": model_type, **(extra(args) if extra else {}),
            **base_config(args, bos_id, eos_id, dtype)}


def native_mapping(architecture: str, model_type: str, mlp: str, qk_norm: bool,
                   extra_config: Optional[Callable[[TransformerArgs], dict]] = None) -> HFMapping:
    """The mapping onto a native transformers class that computes the Transformer with this MLP and QK-norm and no
    logit soft-cap, under Llama's names; `extra_config(args)` adds the class's own config.json fields."""
    return HFMapping(architecture=architecture, model_types=(model_type,),
                     config=partial(native_config, architecture=architecture, model_type=model_type,
                                    extra=extra_config),
                     args_from_config=partial(args_from_config, mlp=mlp, qk_norm=qk_norm), to_hf=transformer_to_hf,
                     from_hf=transformer_from_hf, check_matches=check_matches,
                     unsupported=partial(differs, mlp=mlp, qk_norm=qk_norm))
