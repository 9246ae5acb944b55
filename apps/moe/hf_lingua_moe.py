"""The MoE as lingua's own remote-code class (`LinguaMoEForCausalLM`: LinguaForCausalLM with `n_experts`,
lingua/hf/remote/), for what Mixtral cannot express: sigmoid gates, gates not renormalised, shared experts, the
selection bias, QK-norm, the logit soft-cap. MOE_SPEC lists Mixtral first (hf_mixtral.py), this second.

Attention, norms, embeddings and the RoPE layout are the transformer's (lingua/models/transformer/hf.py). The MoE
keeps our tensors as they are under `model.layers.{i}.mlp.`: `router.weight`, `w1` `w3` [n_experts, dim, hidden] and
`w2` [n_experts, hidden, dim] (x @ w), `expert_bias`; the shared expert is a SwiGLU (`shared.gate_proj` ...).
"""

import re

import torch

from apps.moe.args import MoEArgs
from apps.moe.hf_mixtral import moe_check_matches
from lingua.errors import LinguaError
from lingua.hf.mapping import HFMapping, full_tensor
from lingua.models.transformer.hf import _relayout, hf_name
from lingua.models.transformer.hf_lingua import lingua_args_from_config, lingua_config

# ours under `layers.{i}.feed_forward.` -> theirs under `model.layers.{i}.mlp.`
MOE_NAMES = {"router.weight": "router.weight", "experts.w1": "w1", "experts.w2": "w2", "experts.w3": "w3",
             "expert_bias": "expert_bias", "shared.w1.weight": "shared.gate_proj.weight",
             "shared.w3.weight": "shared.up_proj.weight", "shared.w2.weight": "shared.down_proj.weight"}


def moe_name(name: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.(.+)", name)
    if m is None:
        return hf_name(name)
    if m.group(2) not in MOE_NAMES:
        raise LinguaError(f"parameter '{name}' has no LinguaMoEForCausalLM equivalent")
    return f"model.layers.{m.group(1)}.mlp.{MOE_NAMES[m.group(2)]}"


def lingua_moe_to_hf(state: dict, args) -> dict:
    return {moe_name(name): _relayout(name, full_tensor(t).detach(), args, to_hf=True).contiguous()
            for name, t in state.items() if not (name == "output.weight" and args.weight_tying)}


def lingua_moe_from_hf(hf_state: dict, args) -> dict:
    """The exact inverse of `lingua_moe_to_hf`."""
    ours_names = ["tok_embeddings.weight", "norm.weight", "output.weight"] + [
        f"layers.{i}.{k}" for i in range(args.n_layers) for k in
        ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
         "attention_norm.weight", "ffn_norm.weight"] + (["attention.q_norm.weight", "attention.k_norm.weight"]
                                                        if args.qk_norm else []) +
        [f"feed_forward.{k}" for k in MOE_NAMES if args.n_shared_experts or not k.startswith("shared.")]]
    theirs_to_ours = {moe_name(n): n for n in ours_names}
    ours = {}
    for key, t in hf_state.items():
        if key not in theirs_to_ours:
            raise LinguaError(f"Hugging Face tensor '{key}' has no place in this lingua MoE")
        ours[theirs_to_ours[key]] = _relayout(theirs_to_ours[key], t, args, to_hf=False)
    ours.setdefault("output.weight", ours.get("tok_embeddings.weight"))
    missing = [moe_name(n) for n in ours_names if ours.get(n) is None]
    if missing:
        raise LinguaError(f"Hugging Face checkpoint has no '{missing[0]}'")
    return ours


def lingua_moe_config(args, bos_id=None, eos_id=None, dtype=torch.float32) -> dict:
    cfg = lingua_config(args, bos_id, eos_id, dtype)
    cfg["auto_map"] = {"AutoConfig": "configuration_lingua.LinguaMoEConfig",
                       "AutoModelForCausalLM": "modeling_lingua.LinguaMoEForCausalLM"}
    return {**cfg, "architectures": ["LinguaMoEForCausalLM"], "model_type": "lingua_moe", "n_experts": args.n_experts,
            "num_experts_per_tok": args.top_k, "moe_intermediate_size": args.expert_dim,
            "n_shared_experts": args.n_shared_experts, "gate": args.gate, "route_norm": bool(args.route_norm)}


def lingua_moe_args_from_config(cfg_path, cfg: dict) -> MoEArgs:
    base = lingua_args_from_config(cfg_path, cfg)
    try:
        return MoEArgs(**base.__dict__, n_experts=int(cfg["n_experts"]), top_k=int(cfg["num_experts_per_tok"]),
                       moe_hidden_dim=int(cfg["moe_intermediate_size"]), n_shared_experts=int(cfg["n_shared_experts"]),
                       gate=cfg["gate"], route_norm=bool(cfg["route_norm"]))
    except KeyError as e:
        raise LinguaError(f"{cfg_path}: missing {e.args[0]}") from None


LINGUA_MOE = HFMapping(architecture="LinguaMoEForCausalLM", model_types=("lingua_moe",), config=lingua_moe_config,
                       args_from_config=lingua_moe_args_from_config, to_hf=lingua_moe_to_hf,
                       from_hf=lingua_moe_from_hf, check_matches=moe_check_matches, remote_code=True)
