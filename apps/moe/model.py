"""A Llama-style decoder whose feed-forward is a routed mixture of experts (Mixtral; DeepSeek-V3's routing options).

    block: h = x + attention(RMSNorm(x)); out = h + MoE(RMSNorm(h))
    MoE(x) = shared(x) + sum over the top_k experts e chosen for x of  gate_e(x) * SwiGLU_e(x)

Routing is token-choice and dropless (no capacity: every token reaches its top_k experts). Gates are a softmax or a
sigmoid of the router logits; the selection may add a per-expert bias that is no part of the gate (DeepSeek-V3's
auxiliary-loss-free balancing: after each optimizer step, overloaded experts' biases go down, underloaded ones' up,
by model.bias_update_rate). The training loss adds aux_loss_coef * the Switch load-balancing loss and z_loss_coef *
the router z-loss (ST-MoE) of every layer. Expert weights are one [n_experts, ...] tensor per projection, computed
with grouped matmuls (torch._grouped_mm) or a loop over the experts (model.grouped_mm; see benchmarks/moe_dispatch.py).
Expert parallelism is applied from outside (apps/moe/parallelize.py); tokens reach sharded experts through
apps/moe/dispatch.py.
The `model:` section is MoEArgs (apps/moe/args.py); MOE_SPEC at the end is what the train loop, eval, generate and
export take.
"""

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from apps.moe.args import MoEArgs
from apps.moe.dispatch import balanced_routing, expert_parallel_compute
from apps.moe.grouped import experts_swiglu
from apps.moe.hf_lingua_moe import LINGUA_MOE
from apps.moe.hf_mixtral import MIXTRAL
from apps.moe.parallelize import larger_ep, parallelize_moe
from lingua.models.decoder import next_token
from lingua.models.init import trunc_normal_
from lingua.models.layers import FeedForward, init_output_
from lingua.models.spec import ModelSpec
from lingua.models.transformer.model import (
    Transformer,
    TransformerArgs,
    TransformerBlock,
)
from lingua.models.transformer.model import flops_per_token as transformer_flops
from lingua.models.transformer.spec import describe_attention


def use_grouped_mm(setting) -> bool:
    """model.grouped_mm. auto: torch._grouped_mm wherever this torch has it: on 2 CPU cores it measured as fast as
    the loop at 8 experts and 2x faster at 32 (benchmarks/moe_dispatch.py)."""
    return str(setting).lower() != "false" and hasattr(torch, "_grouped_mm")


# ---------------------------------------------------------------- experts and router


class GroupedExperts(nn.Module):
    """n_experts SwiGLUs as three [n_experts, ...] weights (x @ w layout), so a sharded checkpoint reshards them
    along dim 0 natively. Under expert parallelism this module holds only its rank's experts."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, grouped_mm: str = "auto"):
        super().__init__()
        self.dim, self.hidden_dim, self.grouped_mm = dim, hidden_dim, grouped_mm
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (n_rows, dim) sorted by expert, counts[e] rows for local expert e -> (n_rows, dim)."""
        w1, w2, w3 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w2, self.w3))
        if use_grouped_mm(self.grouped_mm):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            return experts_swiglu(x, w1, w3, w2, offs)  # (n_rows, dim); bf16 and aligned dims on CUDA
        outs = []
        for e, rows in enumerate(torch.split(x, counts.tolist())):  # one host sync: the split sizes
            outs.append((F.silu(rows @ w1[e]) * (rows @ w3[e])) @ w2[e])
        return torch.cat(outs) if outs else x[:0]

    def init_weights(self, init_base_std: Optional[float], factor: float):
        in_std = init_base_std or self.dim**-0.5
        trunc_normal_(self.w1, in_std)
        trunc_normal_(self.w3, in_std)
        init_output_(self.w2, (init_base_std or self.hidden_dim**-0.5) / factor)


def expert_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert (n_experts,) int64, as torch.bincount(minlength=n_experts) gives them, but without the host
    sync bincount pays on CUDA (it reads the max id first to size its output)."""
    ids = expert_ids.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def route(logits: torch.Tensor, bias: torch.Tensor, args: MoEArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (n_tok, n_experts), fp32 -> (gates (n_tok, top_k), experts (n_tok, top_k), probs (n_tok,
    n_experts)): the bias only chooses (DeepSeek-V3), the gates come from the unbiased scores; probs are the scores
    normalised per token, which the balancing loss reads."""
    scores = logits.softmax(-1) if args.gate == "softmax" else logits.sigmoid()
    experts = torch.topk(scores + bias, args.top_k, dim=-1, sorted=True).indices  # ties: the lower index
    gates = scores.gather(-1, experts)
    if args.route_norm:
        gates = gates / gates.sum(-1, keepdim=True)
    probs = scores if args.gate == "softmax" else scores / scores.sum(-1, keepdim=True)
    return gates, experts, probs


class MoE(nn.Module):
    """Router, experts, optional shared expert. Training forwards add the step's tokens per expert to
    `tokens_per_expert` (summed over data-parallel ranks when `stats_group` is set, so the balancing statistics and
    the bias update are the global batch's); `after_optimizer_step` moves them to `last_load`."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args, hidden = args, args.expert_dim
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = GroupedExperts(args.n_experts, args.dim, hidden, args.grouped_mm)
        if args.n_shared_experts:
            self.shared = FeedForward(args.dim, args.n_shared_experts * hidden)
        self.register_buffer("expert_bias", torch.zeros(args.n_experts))  # saved: an exact resume needs it
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_experts), persistent=False)
        self.register_buffer("last_load", torch.zeros(args.n_experts), persistent=False)
        self.register_buffer("last_losses", torch.zeros(3), persistent=False)  # aux, z, dropped token slots
        self.stats_group = None  # process group the routing counts are summed over (set by parallelize.py)
        self.ep_group, self.ep_size = None, 1  # expert-parallel group (set by parallelize.py); None: all experts here

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (bs, seqlen, dim) -> (output (bs, seqlen, dim), the weighted aux + z loss of this layer)."""
        flat = x.reshape(-1, x.shape[-1])  # (n_tok, dim)
        logits = self.router(flat).float()  # (n_tok, n_experts)
        gates, experts, probs = route(logits, self.expert_bias, self.args)
        counts = expert_counts(experts, self.args.n_experts)  # (n_experts,)
        if self.stats_group is not None:
            counts = counts.clone()
            torch.distributed.all_reduce(counts, group=self.stats_group)
        out, n_done = self.dispatch(flat, experts, gates.to(flat.dtype))
        if hasattr(self, "shared"):
            out = out + self.shared(flat)
        aux = self.args.n_experts * (counts.float() / counts.sum() * probs.mean(0)).sum()  # Switch: E * sum f_i P_i
        z = torch.logsumexp(logits, -1).square().mean()
        with torch.no_grad():
            self.last_losses.copy_(torch.stack([aux.detach(), z.detach(), experts.numel() - n_done]))
            if self.training:
                self.tokens_per_expert.add_(counts.float())
        return out.view_as(x), self.args.aux_loss_coef * aux + self.args.z_loss_coef * z

    def dispatch(self, flat: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor):
        """Every (token, expert) pair through its expert, gate-weighted and summed per token: (n_tok, dim), and how
        many pairs were computed (all of them: dropless)."""
        order = experts.flatten().argsort(stable=True)  # the (token, slot) pairs grouped by expert
        tokens = order // self.args.top_k
        ys = run_experts(self, flat[tokens], experts.flatten()[order])  # (n_tok * top_k, dim)
        ys = ys * gates.flatten()[order, None]
        n_done = torch.full((), float(ys.shape[0]), device=flat.device)  # a fill, not a host-to-device copy
        return torch.zeros_like(flat).index_add_(0, tokens, ys), n_done

    def init_weights(self, init_base_std: Optional[float], factor: float):
        trunc_normal_(self.router.weight, init_base_std or self.args.dim**-0.5)
        self.experts.init_weights(init_base_std, factor)
        if hasattr(self, "shared"):
            self.shared.init_weights(init_base_std, factor)
        self.init_buffers()

    def init_buffers(self) -> None:
        for buf in (self.expert_bias, self.tokens_per_expert, self.last_load, self.last_losses):
            buf.zero_()


@torch.compiler.disable
def run_experts(moe: MoE, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """rows (n, dim) sorted by expert id (n,) through their experts. Always eager, the rest of the model compiled:
    the rows per expert change every step (a compiled loop would recompile each time) and torch 2.13's
    compile-time shape function of _grouped_mm accepts bf16 only."""
    if moe.ep_group is not None:
        return expert_parallel_compute(moe, rows, expert_ids)
    return moe.experts(rows, expert_counts(expert_ids, moe.args.n_experts))


# ---------------------------------------------------------------- block and model


class MoEBlock(TransformerBlock):
    """The transformer block with the MoE as its feed-forward; it returns its layer's weighted aux + z loss beside
    the hidden state, a plain output that FSDP's hooks and activation checkpointing pass through like any other."""

    def __init__(self, args: MoEArgs):
        super().__init__(args)
        self.feed_forward = MoE(args)

    def forward(self, x, freq_cos, freq_sin, mask, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.attention(self.attention_norm(x), freq_cos, freq_sin, mask, cache)
        out, aux = self.feed_forward(self.ffn_norm(h))
        return h + out, aux  # (bs, seqlen, dim), a scalar


class MoETransformer(Transformer):
    block_cls = MoEBlock

    def forward(self, tokens, target=None, tok_idx=None, cache=None):
        """Decoder.forward, summing the blocks' aux losses on the way: with a target and gradients on (training),
        the loss is the cross-entropy plus every layer's weighted aux and z losses (what training minimises and logs
        as `loss`); evaluation (no gradients) scores the cross-entropy alone."""
        self.check_length(tokens, cache)
        freq_cos, freq_sin, mask = self.block_inputs(tokens, tok_idx, cache)
        h, aux = self.tok_embeddings(tokens), 0.0  # (bs, seqlen, dim)
        for i, block in enumerate(self.layers):
            h, layer_aux = block(h, freq_cos, freq_sin, mask, cache=None if cache is None else cache.layer(i))
            aux = aux + layer_aux
        if cache is not None:
            cache.len += tokens.shape[1]
        h = self.norm(h)
        if target is None:
            return self.logits(h)
        loss = self.loss(h, next_token(target))
        return loss + aux if torch.is_grad_enabled() else loss

    def init_buffers(self) -> None:
        super().init_buffers()
        for moe in moe_layers(self):
            moe.init_buffers()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


# ---------------------------------------------------------------- hooks of the train loop


@torch.no_grad()
def after_optimizer_step(model: nn.Module) -> None:
    """Keep the step's load for the log; with bias_update_rate > 0, move each expert's selection bias towards
    balance: b_e += rate * sign(mean load - load_e) (DeepSeek-V3, section 2.1.2)."""
    for moe in moe_layers(model):
        load = moe.tokens_per_expert
        moe.last_load.copy_(load)
        if moe.args.bias_update_rate > 0:  # no update before any token was routed: a mask, not a host read
            moe.expert_bias.add_(moe.args.bias_update_rate * torch.sign(load.mean() - load) * (load.sum() > 0))
        load.zero_()


def step_metrics(model: nn.Module) -> dict:
    """Per layer i: moe/load_max/i, moe/load_mean/i (tokens per expert in the last step) and their ratio
    moe/imbalance/i (1 = perfectly balanced); over layers: moe/aux_loss, moe/z_loss (unweighted, last micro-batch)
    and moe/dropped (token slots no expert computed; dropless routing keeps it 0)."""
    out, losses = {}, []
    for i, moe in enumerate(moe_layers(model)):
        load = moe.last_load
        mx, mean = load.max().item(), load.mean().item()
        out.update({f"moe/load_max/{i}": mx, f"moe/load_mean/{i}": mean})
        if mean > 0:  # metrics.jsonl holds no NaN: no ratio before the first step
            out[f"moe/imbalance/{i}"] = mx / mean
        losses.append(moe.last_losses)
    if losses:
        aux, z, dropped = torch.stack(losses).T.tolist()
        out.update({"moe/aux_loss": sum(aux) / len(aux), "moe/z_loss": sum(z) / len(z), "moe/dropped": sum(dropped)})
    return out


# ---------------------------------------------------------------- counting


def active_params_delta(args: MoEArgs) -> int:
    """Per layer: the MoE's parameters one token uses (router, top_k + shared experts) minus the dense SwiGLU's."""
    dense = 3 * args.dim * args.ffn_dim
    active = args.dim * args.n_experts + 3 * args.dim * args.expert_dim * (args.top_k + args.n_shared_experts)
    return active - dense


def flops_per_token(args: MoEArgs, seq_len: int) -> float:
    """Training FLOPs per token counting *active* parameters only (lingua.models.transformer.model.flops_per_token with each
    layer's dense SwiGLU replaced by the router and the top_k + shared experts a token goes through)."""
    return transformer_flops(args, seq_len) + 6 * args.n_layers * active_params_delta(args)


def dense_equivalent(args: MoEArgs) -> TransformerArgs:
    """The dense transformer with this model's attention and shapes (benchmarks compare the two)."""
    names = {f.name for f in dataclasses.fields(TransformerArgs)}
    return TransformerArgs(**{k: v for k, v in dataclasses.asdict(args).items() if k in names})


MOE_SPEC = ModelSpec(name="moe", path="apps.moe.model:MOE_SPEC", args_cls=MoEArgs, build=MoETransformer,
                     flops_per_token=flops_per_token, hf=(MIXTRAL, LINGUA_MOE), describe=describe_attention,
                     parallelize=parallelize_moe, step_metrics=step_metrics, after_optimizer_step=after_optimizer_step,
                     simulate_context=balanced_routing, plan_candidates=larger_ep)
