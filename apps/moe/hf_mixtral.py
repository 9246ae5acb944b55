"""The Hugging Face mapping of apps/moe's model as `MixtralForCausalLM`, where the options map: softmax gates
renormalised over the top_k (model.gate=softmax, route_norm=true), no shared expert, no selection bias
(bias_update_rate=0). Anything else is refused in one line.

Attention, norms, embeddings and the RoPE layout are the Llama mapping's (lingua/models/transformer/hf.py). The MoE: the router
`layers.{i}.feed_forward.router.weight` is `model.layers.{i}.block_sparse_moe.gate.weight`; our expert tensors
[n_experts, dim, hidden] (x @ w) become per-expert nn.Linear weights `block_sparse_moe.experts.{e}.w1.weight`
(hidden, dim), w3 likewise, w2 (dim, hidden): the layout of Mixtral checkpoints on the Hub, which transformers 5
fuses into its 3D experts tensors when it loads them.
"""

import re
from typing import Optional

import torch

from apps.moe.args import MoEArgs
from lingua.errors import LinguaError
from lingua.hf.mapping import HFMapping, full_tensor
from lingua.models.transformer import hf
from lingua.models.transformer.hf import HF_LAYER_NAMES, _relayout, hf_name


def mixtral_unsupported(args) -> Optional[str]:
    """What Mixtral (softmax top-k gates renormalised, no shared expert, no selection bias) cannot express."""
    for bad, why in ((args.gate != "softmax", f"model.gate={args.gate}"), (not args.route_norm, "route_norm=false"),
                     (args.n_shared_experts > 0, "a shared expert"), (args.bias_update_rate > 0, "a selection bias"),
                     (args.logit_softcap is not None, "model.logit_softcap"), (args.qk_norm, "model.qk_norm")):
        if bad:
            return why
    return None


def _moe_name(layer: str, ours: str) -> Optional[str]:
    return {"router.weight": f"model.layers.{layer}.block_sparse_moe.gate.weight"}.get(ours)


def mixtral_to_hf(state: dict, args) -> dict:
    if mixtral_unsupported(args):
        raise LinguaError(f"{mixtral_unsupported(args)} has no MixtralForCausalLM equivalent: export refused")
    out = {}
    for name, t in state.items():
        if name == "output.weight" and args.weight_tying:
            continue
        t = full_tensor(t).detach()
        m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.(.+)", name)
        if m is None:
            out[hf_name(name)] = _relayout(name, t, args, to_hf=True).contiguous()
        elif m.group(2) == "expert_bias":
            continue  # all zeros: export refuses bias_update_rate > 0
        elif m.group(2).startswith("experts."):
            w = m.group(2).split(".")[1]  # w1 | w2 | w3
            for e in range(t.shape[0]):
                out[f"model.layers.{m.group(1)}.block_sparse_moe.experts.{e}.{w}.weight"] = t[e].T.contiguous()
        else:
            out[_moe_name(m.group(1), m.group(2))] = t.contiguous()
    return out


def mixtral_from_hf(hf_state: dict, args) -> dict:
    """The exact inverse of `mixtral_to_hf` (Hub-layout Mixtral checkpoints)."""
    ours, experts = {}, {}
    for key, t in hf_state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.(.+)", key)
        if m is None:
            name = {hf_name(n): n for n in ("tok_embeddings.weight", "norm.weight", "output.weight")}.get(key)
            if name is None:
                lm = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
                inv = {v: k for k, v in HF_LAYER_NAMES.items() if not k.startswith("feed_forward.")}
                if lm is None or lm.group(2) not in inv:
                    raise LinguaError(f"Hugging Face tensor '{key}' has no place in a lingua MoE")
                name = f"layers.{lm.group(1)}.{inv[lm.group(2)]}"
            ours[name] = _relayout(name, t, args, to_hf=False)
        elif m.group(2) == "gate.weight":
            ours[f"layers.{m.group(1)}.feed_forward.router.weight"] = t
        else:
            e, w = re.fullmatch(r"experts\.(\d+)\.(w[123])\.weight", m.group(2)).groups()
            experts.setdefault((m.group(1), w), {})[int(e)] = t.T
    for (layer, w), per in experts.items():
        ours[f"layers.{layer}.feed_forward.experts.{w}"] = torch.stack([per[e] for e in sorted(per)])
    for layer in range(args.n_layers):
        ours[f"layers.{layer}.feed_forward.expert_bias"] = torch.zeros(args.n_experts)
    if "output.weight" not in ours:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    return ours


def mixtral_config(args, bos_id=None, eos_id=None, dtype=torch.float32) -> dict:
    cfg = hf.base_config(args, bos_id, eos_id, dtype)
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=args.expert_dim,
               num_local_experts=args.n_experts, num_experts_per_tok=args.top_k, router_jitter_noise=0.0,
               output_router_logits=False, router_aux_loss_coef=args.aux_loss_coef, sliding_window=None)
    return cfg


def mixtral_args_from_config(cfg_path, cfg: dict):
    """MoEArgs for a Mixtral config.json (its Llama part read by lingua/models/transformer/hf.py)."""
    # the dense width whose 1 / top_k is the experts' (what model.moe_hidden_dim=null would take)
    dense = int(cfg["intermediate_size"]) * int(cfg.get("num_experts_per_tok", 2))
    base = hf.args_from_config(cfg_path, {**cfg, "intermediate_size": dense}, mlp="swiglu", qk_norm=False)
    return MoEArgs(**base.__dict__, n_experts=int(cfg["num_local_experts"]), top_k=int(cfg["num_experts_per_tok"]),
                   moe_hidden_dim=int(cfg["intermediate_size"]))


def moe_check_matches(hf_args, args, path) -> None:
    """The transformer's checks, then the routing and the experts' shapes (this mapping's and hf_lingua_moe.py's)."""
    hf.check_matches(hf_args, args, path)
    for key in ("n_experts", "top_k", "n_shared_experts", "gate", "route_norm"):
        if getattr(hf_args, key) != getattr(args, key):
            raise LinguaError(f"Hugging Face model '{path}' has model.{key}={getattr(hf_args, key)} but this model "
                              f"has {getattr(args, key)}")
    if hf_args.expert_dim != args.expert_dim:
        raise LinguaError(f"Hugging Face model '{path}' has experts {hf_args.expert_dim} wide but this model "
                          f"has {args.expert_dim}")


MIXTRAL = HFMapping(architecture="MixtralForCausalLM", model_types=("mixtral",), config=mixtral_config,
                    args_from_config=mixtral_args_from_config, to_hf=mixtral_to_hf, from_hf=mixtral_from_hf,
                    check_matches=moe_check_matches, unsupported=mixtral_unsupported)
