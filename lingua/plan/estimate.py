"""From one simulated step (lingua.plan.simulate) to a step time, tok/s per GPU and MFU on a given GPU.

The model, in full (README "Planning a run"):
    compute   = executed FLOPs / (peak x KERNEL_EFFICIENCY); executed = matmuls counted + attention by formula
                (x 4/3 under full AC, whose backward recomputes the forward), at least the spec's own FLOPs count
                (for a kernel no formula covers, lingua/plan/flops.py giving FlopCounterMode MoE's grouped GEMM;
                not under pipeline parallelism, whose stages the count does not split); under PP the attention
                formula takes the rank's share of the blocks
    a collective moves bytes x (n-1)/n per rank (all-reduce: twice that; send/recv: bytes) over NVLink when its
                group sits in one node, else over the GPU's share of the inter-node network
    data-parallel collectives (FSDP all-gather / reduce-scatter, DDP/HSDP all-reduce) overlap with compute;
    tensor-parallel, all-to-all (expert parallel) and send/recv collectives sit on the critical path
    optimizer = 2 x (params + grads + optimizer state bytes) / HBM bandwidth (read and write once)
    pipeline  = compute x (m + (p - 1) / v) / m: the bubble of p pipeline ranks over m microbatches, v stages per
                rank (GPipe, 1F1B: v = 1; interleaved 1F1B: v = pp_stages_per_rank); zero-bubble schedules (zbv,
                dualpipev): (m + (p - 1) / 3) / m, the ZB-H1 rate of Qi et al. ("Zero Bubble Pipeline Parallelism":
                ZB-V's 0 assumes equal F, B, W times and a post-update validation of the gradient norm that lingua
                does not do; between 1F1B's bubble and none). Each rank's compute is its own stage's.
    step      = max(compute x pipeline, data-parallel comm) + exposed comm + optimizer
"""

from dataclasses import dataclass

from lingua.plan.comm import CommCounts
from lingua.plan.gpus import GPU

# The fraction of the dense peak that a training step's kernels reach when nothing waits for communication, set to
# the closest published stack to lingua's (torchtitan: FSDP2 + compile, Llama 3.1 8B on 8x H100, bf16: 39% MFU, where
# communication hides behind compute); Megatron-LM reaches up to 47% on H100. Not measured here: change it and every
# compute-bound tok/s moves in proportion.
KERNEL_EFFICIENCY = 0.4
EXPOSED_KINDS = ("all_to_all", "send_recv")


def pipeline_factor(schedule: str, microbatches: int, pp: int, stages_per_rank: int) -> float:
    """A pipeline step's time over its ranks' compute (1 without pipeline parallelism); see the module docstring."""
    if pp == 1:
        return 1.0
    idle = (pp - 1) / 3 if schedule in ("zbv", "dualpipev") else (pp - 1) / stages_per_rank
    return (microbatches + idle) / microbatches


@dataclass
class StepTime:
    executed_flops: float  # per GPU per step
    compute_s: float
    dp_comm_s: float  # overlapped with compute
    exposed_comm_s: float
    optimizer_s: float
    step_s: float
    tok_per_s_gpu: float
    mfu: float
    bubble: float = 0.0  # the pipeline's idle share of the step's compute time (0 without pipeline parallelism)


def comm_seconds(kind: str, ranks: tuple, nbytes: int, gpu: GPU) -> float:
    n = len(ranks)
    if n == 1:
        return 0.0
    bw = gpu.intra_bw if len({r // gpu.per_node for r in ranks}) == 1 else gpu.inter_bw
    factor = 1.0 if kind == "send_recv" else (n - 1) / n * (2 if kind == "all_reduce" else 1)
    return nbytes * factor / bw


def split_comm(comm: CommCounts, tp_ranks: tuple, gpu: GPU) -> tuple[float, float]:
    """(data-parallel seconds, exposed seconds) of a step's collectives; exposed: the TP group's, all-to-all, p2p."""
    dp = exposed = 0.0
    for (kind, ranks), nbytes in comm.bytes.items():
        s = comm_seconds(kind, ranks, nbytes, gpu)
        if kind in EXPOSED_KINDS or (len(tp_ranks) > 1 and ranks == tp_ranks):
            exposed += s
        else:
            dp += s
    return dp, exposed


def matmul_peak(gpu: GPU, dtype: str, float8: bool) -> float:
    if float8 and gpu.fp8_flops:
        return gpu.fp8_flops
    return gpu.bf16_flops / 2 if dtype == "fp32" else gpu.bf16_flops  # fp32: TF32 tensor cores, half the bf16 rate


def estimate_time(measure, gpu: GPU, *, attn_flops_per_token: float, model_flops_per_token: float, tp_ranks: tuple,
                  split: int, tokens_per_gpu: float, full_ac: bool, dtype: str, float8: bool,
                  layer_share: float = 1.0, pipeline: float = 1.0) -> StepTime:
    """`measure` is a StepMeasure; split = tp x cp, the ranks a replica's tokens are shared by; tokens_per_gpu = the
    global batch's tokens / world size; layer_share: the share of the blocks this rank runs (a pipeline stage's);
    pipeline = `pipeline_factor`."""
    attn = attn_flops_per_token * measure.tokens * layer_share / split * (4 / 3 if full_ac else 1)
    # the spec's own count is a floor: FlopCounterMode sees only the kernels it has formulas for; not for a
    # pipeline stage (the count does not split by stage: the output projection is the last stage's alone)
    floor = model_flops_per_token * measure.tokens / split - attn if layer_share == 1 else 0.0
    matmuls = max(measure.matmul_flops, floor)
    compute = (matmuls / matmul_peak(gpu, dtype, float8) + attn / gpu.bf16_flops) / KERNEL_EFFICIENCY
    dp, exposed = split_comm(measure.comm, tp_ranks, gpu)
    m = measure.memory
    optimizer = 2 * sum(m.get(k, 0) for k in ("params", "grads", "optimizer")) / gpu.hbm_bw
    step = max(compute * pipeline, dp) + exposed + optimizer
    tok_s = tokens_per_gpu / step
    return StepTime(matmuls + attn, compute, dp, exposed, optimizer, step, tok_s,
                    model_flops_per_token * tok_s / gpu.bf16_flops, 1 - 1 / pipeline)
