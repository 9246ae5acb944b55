"""lingua's Transformer as its own transformers class, `LinguaForCausalLM` (model_type `lingua`): the code is
lingua/hf/remote/{configuration,modeling}_lingua.py, copied into the export and named by config.json's `auto_map`,
so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs it with torch and transformers only.
It implements every switch of the Transformer (SwiGLU or ReLU² MLP, QK-norm, logit soft-cap, tied embeddings, GQA,
RoPE theta, SDPA's 1/sqrt(head_dim) scaling), so it is the export of last resort: spec.py lists it after the
native classes, which vLLM and llama.cpp also load. Names and the RoPE layout are hf.py's (Llama's)."""

from lingua.errors import LinguaError
from lingua.hf.mapping import HFMapping
from lingua.models.transformer import hf


def lingua_config(args, bos_id=None, eos_id=None, dtype=None) -> dict:
    head_dim = args.heads.head_dim
    return hf.native_config(args, bos_id, eos_id, dtype, architecture="LinguaForCausalLM", model_type="lingua",
                            extra=lambda args: {
                                "auto_map": {"AutoConfig": "configuration_lingua.LinguaConfig",
                                             "AutoModelForCausalLM": "modeling_lingua.LinguaForCausalLM"},
                                "mlp": args.mlp, "qk_norm": bool(args.qk_norm), "logit_softcap": args.logit_softcap,
                                "attention_scale": head_dim**-0.5})


def lingua_args_from_config(cfg_path, cfg: dict):
    mlp = cfg.get("mlp", "swiglu")
    if mlp not in hf.MLP_NAMES:
        raise LinguaError(f"{cfg_path}: mlp '{mlp}' is not one of {', '.join(hf.MLP_NAMES)}")
    args = hf.args_from_config(cfg_path, cfg, mlp=mlp, qk_norm=bool(cfg.get("qk_norm")),
                               logit_softcap=cfg.get("logit_softcap"))
    scale = cfg.get("attention_scale")
    if scale is not None and abs(scale - args.heads.head_dim ** -0.5) > 1e-12:
        raise LinguaError(f"{cfg_path}: attention_scale={scale} is not lingua's 1/sqrt(head_dim)")
    return args


LINGUA = HFMapping(architecture="LinguaForCausalLM", model_types=("lingua",), config=lingua_config,
                   args_from_config=lingua_args_from_config, to_hf=hf.transformer_to_hf,
                   from_hf=hf.transformer_from_hf, check_matches=hf.check_matches, remote_code=True)
