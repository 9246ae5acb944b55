"""lingua.plan on the MoE app with expert parallelism: the fake-tensor step under balanced routing moves exactly the
analytic all-to-all bytes, priced as exposed communication; each rank holds and gathers exactly its share of the
experts (no FSDP padding); the simulation's context does not change a real step; a MoE that does not fit is offered
a larger ep_size."""

import pytest
import torch

from apps.moe.dispatch import balanced_routing
from apps.moe.model import MOE_SPEC, MoE, MoEArgs
from lingua.args import load_config
from lingua.plan.estimate import split_comm
from lingua.plan.gpus import get_gpu
from lingua.plan.simulate import build_parallel, dist_state, fake_world, sim_args, simulate_step
from lingua.train.loop import train_args_cls

BF16 = 2  # bytes: the simulated step's rows and gathered weights are bf16 (model_dtype auto on the GPU policy)


def tiny_args(world_size: int, ep: int, n_experts: int):
    return load_config(train_args_cls(MOE_SPEC), [
        "config=apps/moe/configs/debug.yaml", "model.n_layers=2", "model.dim=64", "model.vocab_size=256",
        "data.batch_size=2", "data.seq_len=32", f"model.n_experts={n_experts}", f"distributed.ep_size={ep}"])


@pytest.mark.parametrize("world_size, ep, n_experts", [(2, 2, 4), (4, 4, 4), (4, 2, 2)])
def test_ep_all_to_all_bytes_are_the_balanced_count_and_exposed(world_size, ep, n_experts):
    """Per layer: the counts' all-to-all (n_experts int64) and four of the routed rows (dispatch and combine, forward
    and backward), each of batch x seq x top_k rows x dim in bf16. Counted as what a rank sends (its own share
    included); the time model moves (ep - 1) / ep of it, on the critical path."""
    args = tiny_args(world_size, ep, n_experts)
    m = args.model
    measure = simulate_step(args, MOE_SPEC, world_size)
    rows = args.data.batch_size * args.data.seq_len * m.top_k
    expected = m.n_layers * (4 * rows * m.dim * BF16 + n_experts * 8)
    assert {k: n for k, n in measure.comm.bytes.items() if k[0] == "all_to_all"} == \
        {("all_to_all", tuple(range(ep))): expected}
    assert measure.comm.calls["all_to_all"] == 5 * m.n_layers
    gpu = get_gpu("h100")
    _, exposed = split_comm(measure.comm, (0,), gpu)
    assert exposed == pytest.approx(expected * (ep - 1) / ep / gpu.intra_bw, rel=1e-9)


def test_each_rank_holds_and_gathers_its_share_of_the_experts():
    """4 ranks, ep 2, 2 experts: one expert per EP rank, FSDP-sharded over the 2 ranks that hold it. Each rank stores
    1/4 of every expert weight and gathers exactly 1/2 (its expert) per forward and backward of a block (the last
    block's backward reuses its forward's): FSDP2's dim-0 sharding would pad one expert to two."""
    args = sim_args(tiny_args(4, 2, 2))
    m = args.model
    with fake_world(4, 0):
        model = build_parallel(args, MOE_SPEC, dist_state(args, 4, 0), torch.bfloat16)
        for moe in (block.feed_forward for block in model.layers):
            for p in moe.experts.parameters():
                assert p.to_local().numel() * 4 == p.numel()
    total = m.n_layers * m.n_experts * 3 * m.dim * m.expert_dim
    measure = simulate_step(tiny_args(4, 2, 2), MOE_SPEC, 4)
    gathers = 2 * m.n_layers - 1
    assert measure.comm.bytes[("all_gather", (0, 2))] == gathers * total // m.n_layers // 2 * BF16


def test_balanced_routing_does_not_change_a_real_step():
    """A real expert-parallel forward (a one-rank gloo group) under MOE_SPEC.simulate_context equals the same forward
    without it, with routing far from balanced (every token's first choice is expert 0)."""
    import torch.distributed as dist

    torch.manual_seed(0)
    moe = MoE(MoEArgs(dim=32, n_heads=4, n_experts=4, top_k=2, multiple_of=16))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.expert_bias[0] = 10.0
    x = torch.randn(2, 16, 32)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        moe.ep_group = dist.group.WORLD
        plain, _ = moe(x)
        with MOE_SPEC.simulate_context():
            simulated, _ = moe(x)
    finally:
        dist.destroy_process_group()
    assert MOE_SPEC.simulate_context is balanced_routing
    assert torch.equal(plain, simulated)


def test_a_moe_that_does_not_fit_is_offered_a_larger_ep_size():
    """The MoE spec adds the next ep_size that divides n_experts and the data-parallel ranks to the changes that
    lingua.plan.suggest re-plans (the dense transformer's list has none). Its plan gathers half the experts, and
    peaks lower (each rank stores a quarter of the experts either way: FSDP over 4 ranks or EP 2 x FSDP 2)."""
    from lingua.models.transformer.spec import TRANSFORMER_SPEC
    from lingua.plan.plan import plan, replan
    from lingua.plan.suggest import candidates

    args = tiny_args(4, 1, 4)
    assert {"distributed.ep_size": 2} in candidates(args, 4, MOE_SPEC)
    assert not any("distributed.ep_size" in c for c in candidates(args, 4, TRANSFORMER_SPEC))
    assert {"distributed.ep_size": 4} in candidates(tiny_args(4, 2, 4), 4, MOE_SPEC)
    assert not any("distributed.ep_size" in c for c in candidates(tiny_args(4, 4, 4), 4, MOE_SPEC))
    base = plan(args, MOE_SPEC, 4, "h100", suggest=False)
    ep_plan = replan(base, MOE_SPEC, {"distributed.ep_size": 2})
    assert ep_plan.args.distributed.ep_size == 2
    m, mb = ep_plan.roles[0].measure, base.roles[0].measure
    assert m.memory["params"] == mb.memory["params"] and m.peak_bytes < mb.peak_bytes
    assert m.comm.by_kind()["all_gather"] < mb.comm.by_kind()["all_gather"]


def test_ep_size_must_divide_n_experts():
    from lingua.errors import ConfigError
    from lingua.plan import plan

    with pytest.raises(ConfigError, match="distributed.ep_size=4 must divide model.n_experts=2"):
        plan(tiny_args(4, 4, 2), MOE_SPEC, 4, "h100")


def test_selective_ac_with_experts_fsdp_inside_the_block_keeps_the_all_to_alls():
    """ep = the data-parallel world: the experts' FSDP group (one rank) sits inside each checkpointed block. Torch's
    selective AC failed its backward on the extra profiler annotation FSDP makes when it recomputes them (in a real
    2-process run as in the plan). The recomputed forward sends no rows again (their all-to-alls are saved, as in
    torchtitan); only the counts' exchange is redone: 6 all-to-alls per layer, not 8."""
    args = tiny_args(2, 2, 4)
    args.distributed.ac = "selective"
    m = args.model
    measure = simulate_step(args, MOE_SPEC, 2)
    rows = args.data.batch_size * args.data.seq_len * m.top_k
    assert measure.comm.calls["all_to_all"] == 6 * m.n_layers
    assert measure.comm.by_kind()["all_to_all"] == m.n_layers * (4 * rows * m.dim * BF16 + 2 * m.n_experts * 8)


@pytest.mark.parametrize("ac", ["none", "selective"])
def test_the_grouped_gemm_flops_are_counted(ac):
    """FlopCounterMode has no formula for torch._grouped_mm (lingua/plan/flops.py gives it one): the counted matmul
    FLOPs are 6 x tokens x (attention, router and output weights + top_k experts' weights), exactly, per EP rank
    under balanced routing; selective AC recomputes the experts' forward (their GEMMs are not saved): 2 x more."""
    args = tiny_args(2, 2, 4)
    args.distributed.ac = ac
    m = args.model
    n_heads, n_kv_heads, head_dim = m.heads
    tokens = args.data.batch_size * args.data.seq_len
    dense = m.n_layers * (2 * m.dim * (n_heads + n_kv_heads) * head_dim + m.dim * m.n_experts) + m.vocab_size * m.dim
    experts = m.n_layers * m.top_k * 3 * m.dim * m.expert_dim
    recomputed = 2 * tokens * experts if ac == "selective" else 0
    assert simulate_step(args, MOE_SPEC, 2).matmul_flops == 6 * tokens * (dense + experts) + recomputed
