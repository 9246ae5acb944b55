"""The Hugging Face mapping of apps/mamba's model as transformers' `Mamba2ForCausalLM`, which computes the same
function when the model has Mamba-2 mixers only (no model.mlp) and no logit soft-cap: the same in_proj order
[z | x B C | dt], depthwise causal conv with bias, softplus(dt + dt_bias) with no clamp (time_step_limit (0, inf)),
A = -exp(A_log), D skip, grouped gated RMSNorm (norm after the gate), pre-norm blocks and a final norm.

Names: `layers.{i}.mixer_norm.weight` <-> `backbone.layers.{i}.norm.weight`, `layers.{i}.mixer.X` <->
`backbone.layers.{i}.mixer.X` except the conv, ours (conv_dim, d_conv) against nn.Conv1d's (conv_dim, 1, d_conv);
embeddings, final norm and output are `backbone.embeddings`, `backbone.norm_f`, `lm_head` (left out when tied).
The mapping is built for the model's args class (`mamba2_mapping(MambaArgs)` in model.py), so this file and the
model never import each other.
"""

import re
from functools import partial
from typing import Optional

import torch

from lingua.errors import LinguaError
from lingua.hf.mapping import DTYPE_NAMES, HFMapping, full_tensor

NAMES = {"tok_embeddings.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight",
         "output.weight": "lm_head.weight"}
LAYER_NAMES = {"mixer_norm.weight": "norm.weight", "mixer.conv_weight": "mixer.conv1d.weight",
               "mixer.conv_bias": "mixer.conv1d.bias"}  # and mixer.* as it is


def hf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None or not (m.group(2) in LAYER_NAMES or m.group(2).startswith("mixer.")):
        raise LinguaError(f"parameter '{name}' has no Mamba2ForCausalLM equivalent")
    return f"backbone.layers.{m.group(1)}.{LAYER_NAMES.get(m.group(2), m.group(2))}"


def mamba2_unsupported(args) -> Optional[str]:
    if args.mlp:
        return "model.mlp=true (its blocks are mixers only)"
    if args.logit_softcap is not None:
        return "model.logit_softcap (it has no logit soft-cap)"
    return None


def mamba2_to_hf(state: dict, args) -> dict:
    out = {}
    for name, t in state.items():
        if name == "output.weight" and args.weight_tying:
            continue
        t = full_tensor(t).detach()
        out[hf_name(name)] = (t[:, None] if name.endswith("conv_weight") else t).contiguous()
    return out


def mamba2_from_hf(hf_state: dict, args) -> dict:
    """The exact inverse of `mamba2_to_hf`."""
    theirs_to_ours = {hf_name(n): n for n in NAMES}
    for i in range(args.n_layers):
        for ours in ("mixer_norm.weight", "mixer.conv_weight", "mixer.conv_bias", "mixer.in_proj.weight",
                     "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight"):
            theirs_to_ours[hf_name(f"layers.{i}.{ours}")] = f"layers.{i}.{ours}"
    ours = {}
    for key, t in hf_state.items():
        if key not in theirs_to_ours:
            raise LinguaError(f"Hugging Face tensor '{key}' has no place in a {args.n_layers}-layer lingua Mamba")
        ours[theirs_to_ours[key]] = t[:, 0] if key.endswith("conv1d.weight") else t
    ours.setdefault("output.weight", ours.get("tok_embeddings.weight"))
    missing = [hf_name(n) for n in theirs_to_ours.values() if ours.get(n) is None]
    if missing:
        raise LinguaError(f"Hugging Face checkpoint has no '{missing[0]}'")
    return ours


def mamba2_config(args, bos_id=None, eos_id=None, dtype=torch.float32) -> dict:
    d_inner = args.expand * args.dim
    return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "vocab_size": args.vocab_size, "state_size": args.d_state,
            "expand": args.expand, "head_dim": args.head_dim, "num_heads": d_inner // args.head_dim,
            "n_groups": args.n_groups, "conv_kernel": args.d_conv, "chunk_size": args.chunk_size,
            "layer_norm_epsilon": args.norm_eps, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
            "residual_in_fp32": True, "rms_norm": True, "time_step_min": args.dt_min, "time_step_max": args.dt_max,
            "time_step_floor": args.dt_init_floor, "tie_word_embeddings": bool(args.weight_tying),
            "max_position_embeddings": args.max_seqlen, "initializer_range": args.init_base_std or args.dim**-0.5,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": True,
            "dtype": DTYPE_NAMES.get(dtype, "float32")}


def mamba2_args_from_config(args_cls: type, cfg_path, cfg: dict):
    """Model args for a Mamba2 config.json, or one line naming what lingua's Mamba does not compute."""
    for key, ours in (("use_bias", False), ("use_conv_bias", True), ("hidden_act", "silu"), ("rms_norm", True)):
        if cfg.get(key, ours) != ours:
            raise LinguaError(f"{cfg_path}: {key}={cfg[key]} is not supported (lingua's Mamba has {key}={ours})")
    if list(cfg.get("time_step_limit", [0.0, float("inf")])) != [0.0, float("inf")]:
        raise LinguaError(f"{cfg_path}: time_step_limit={cfg['time_step_limit']} is not supported (no dt clamp)")
    try:
        return args_cls(dim=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]),
                        vocab_size=int(cfg["vocab_size"]), d_state=int(cfg["state_size"]),
                        expand=int(cfg.get("expand", 2)), head_dim=int(cfg["head_dim"]),
                        n_groups=int(cfg.get("n_groups", 1)), d_conv=int(cfg.get("conv_kernel", 4)),
                        chunk_size=int(cfg.get("chunk_size", 256)), norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                        weight_tying=bool(cfg.get("tie_word_embeddings", False)),
                        max_seqlen=int(cfg.get("max_position_embeddings", 2048)))
    except KeyError as e:
        raise LinguaError(f"{cfg_path}: missing {e.args[0]}") from None


def mamba2_check_matches(hf_args, args, path) -> None:
    for key in ("dim", "n_layers", "vocab_size", "d_state", "expand", "head_dim", "n_groups", "d_conv", "mlp"):
        if getattr(hf_args, key) != getattr(args, key):
            raise LinguaError(f"Hugging Face model '{path}' has model.{key}={getattr(hf_args, key)} but this model "
                              f"has {getattr(args, key)}")


def mamba2_mapping(args_cls: type) -> HFMapping:
    return HFMapping(architecture="Mamba2ForCausalLM", model_types=("mamba2",), config=mamba2_config,
                     args_from_config=partial(mamba2_args_from_config, args_cls), to_hf=mamba2_to_hf,
                     from_hf=mamba2_from_hf, check_matches=mamba2_check_matches, unsupported=mamba2_unsupported)
