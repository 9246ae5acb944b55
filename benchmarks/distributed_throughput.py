"""Data-parallel scaling on CPU (1 vs 2 processes, gloo), pipeline bubbles, memory per rank of full_shard vs
no_shard, and context parallelism's step time against one process at the same global sequence length.

    python benchmarks/distributed_throughput.py [--steps 6] [--skip-memory] [--skip-throughput] [--skip-pipeline]
        [--skip-cp]

Throughput: the debug model shape (dim 256, 4 layers, vocab 4096, seq 256) trained on random tokens with the same
build_model / parallelize_model / AdamW / clipping as lingua.train.loop, one OMP thread per process, batch 8 per process:
1 process, then 2 processes with full_shard (FSDP2) and with no_shard (replicate). Reports tok/s per process, total
tok/s and the scaling efficiency = total tok/s of 2 processes / (2 x tok/s of 1 process).

Pipeline: the same model on 2 processes with pp_size=2 (2 stages per rank for interleaved_1f1b), batch 8, for
each schedule and microbatch count: tok/s and the measured bubble, 1 - (time in the stages' forward and backward
chunks) / (step time), averaged over the ranks, next to the schedule's theoretical bubble (p - 1) / (v m + p - 1)
(p pipeline ranks, v stages per rank, m microbatches). The measured one also holds the stages' imbalance (the
first stage embeds, the last projects to the vocabulary and takes the loss) and the send/recv time.

Memory: a ~100M-parameter model (dim 768, 8 layers, vocab 32000) on 2 processes, full_shard vs no_shard: the bytes of
parameters, gradients and AdamW state that each rank holds between steps, and its peak RSS.

Context parallel: the throughput shape at CONTEXT's longer sequences, one sequence per step, 1 process against
distributed.cp_size=2 (each rank holds half of every sequence, attention rings over the two): the step time, and
CP's speedup = 1-process step time / CP step time.

Each configuration is a torchrun job running this file with --worker; rank 0 prints one JSON line the driver reads.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THROUGHPUT = dict(dim=256, n_layers=4, n_heads=4, vocab_size=4096, max_seqlen=256, batch=8, seq=256)
CONTEXT = dict(dim=256, n_layers=4, n_heads=4, vocab_size=4096, batch=1)
CONTEXT_SEQS = (1024, 4096)
MEMORY = dict(dim=768, n_layers=8, n_heads=12, vocab_size=32000, max_seqlen=128, batch=1, seq=128)


def worker(opts) -> None:
    import torch
    import torch.distributed as dist

    from lingua.args import load_config
    from lingua.distributed.mesh import init_distributed
    from lingua.models.transformer.spec import TRANSFORMER_SPEC
    from lingua.train.loop import TrainArgs, build_model
    from lingua.train.optim import build_optimizer, clip_grad_norm_

    shape = json.loads(opts.shape)
    pp = ["distributed.pp_size=2", f"distributed.pp_schedule={opts.pp_schedule}",
          f"distributed.pp_microbatches={opts.pp_microbatches}"] if opts.pp_schedule else []
    args = load_config(TrainArgs, pp + [
        f"model.dim={shape['dim']}", f"model.n_layers={shape['n_layers']}", f"model.n_heads={shape['n_heads']}",
        f"model.vocab_size={shape['vocab_size']}", f"model.max_seqlen={shape['max_seqlen']}", "optim.warmup=0",
        "distributed.model_dtype=fp32", f"distributed.fsdp_type={opts.fsdp_type}", "dump_dir=/tmp/unused",
        f"distributed.cp_size={opts.cp}", f"data.batch_size={shape['batch']}",
    ])
    state = init_distributed(args.distributed)
    try:
        model = build_model(args, TRANSFORMER_SPEC, state, torch.float32)
        optimizer, scheduler = build_optimizer(model, args.optim, opts.steps + 1)
        g = torch.Generator().manual_seed(1000 + state.dp_rank)
        B, S, V = shape["batch"], shape["seq"], shape["vocab_size"]
        compute_s = time_pipeline_chunks() if opts.pp_schedule else [0.0]

        def local_bytes(tensors):
            return sum(getattr(t, "_local_tensor", t).numel() * t.element_size() for t in tensors)

        params = list({id(p): p for p in model.parameters()}.values())
        times, busy, grad_bytes = [], [], 0
        for _ in range(opts.steps + 1):  # the first step pays for allocator and FSDP lazy-init warm-up
            x = torch.randint(0, V, (B, S + 1), generator=g)
            t0 = time.perf_counter()
            compute_s[0] = 0.0
            if opts.pp_schedule:  # forward and backward of every microbatch
                model.step(x[:, :-1], x[:, 1:], torch.arange(S).expand(B, S))
            else:
                model(x[:, :-1], x[:, 1:]).backward()
            grad_bytes = local_bytes([p.grad for p in params if p.grad is not None])
            clip_grad_norm_(model, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            busy.append(compute_s[0])

        optim = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the buffer below
        mine = {
            "rank": state.rank,
            "step_s": statistics.median(times[1:]),
            "bubble": 1 - statistics.median(b / t for b, t in zip(busy[1:], times[1:])),
            "tok_per_s": B * S / statistics.median(times[1:]),
            "param_mb": local_bytes(params) / 2**20,
            "grad_mb": grad_bytes / 2**20,
            "optim_mb": local_bytes(optim) / 2**20,
            "peak_rss_mb": peak_rss_mb,
            "n_params": sum(p.numel() for p in params),
        }
        if dist.is_initialized() and not opts.pp_schedule:  # what the gradient exchange alone costs: one all-reduce
            buf = torch.zeros(sum(p.numel() for p in params))
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(3):
                dist.all_reduce(buf)
            mine["allreduce_s"] = (time.perf_counter() - t0) / 3
        everyone = [None] * state.world_size
        if dist.is_initialized():
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if state.is_main:
            print("RESULT " + json.dumps(everyone), flush=True)
    finally:
        state.close()


def time_pipeline_chunks() -> list:
    """Wrap the pipeline stages' compute (forward and backward chunks; sends and receives are outside them):
    returns the one-element list their seconds add up in."""
    from torch.distributed.pipelining.stage import _PipelineStageBase

    total = [0.0]
    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        def timed(self, *a, _orig=getattr(_PipelineStageBase, name), **k):
            t0 = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                total[0] += time.perf_counter() - t0

        setattr(_PipelineStageBase, name, timed)
    return total


def launch(nproc: int, shape: dict, fsdp_type: str, steps: int, pp_schedule: str = "", microbatches: int = 0,
           cp: int = 1) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_helpers import free_port

    me = [str(Path(__file__).resolve()), "--worker", "--shape", json.dumps(shape), "--fsdp-type", fsdp_type,
          "--steps", str(steps), "--pp-schedule", pp_schedule, "--pp-microbatches", str(microbatches), "--cp", str(cp)]
    if nproc == 1:
        cmd = [sys.executable] + me
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}"] + me
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def context_rows(steps: int) -> None:
    s = CONTEXT
    print(f"\ncontext parallel: dim {s['dim']}, {s['n_layers']} layers, vocab {s['vocab_size']}, one sequence per step, "
          f"causal, median of {steps} steps")
    print(f"{'global seq':>10}  {'layout':<22}{'step ms':>10}{'tok/s':>10}{'speedup':>10}")
    for seq in CONTEXT_SEQS:
        shape = dict(s, seq=seq, max_seqlen=seq)
        one = launch(1, shape, "full_shard", steps)[0]["step_s"]
        cp = statistics.mean(r["step_s"] for r in launch(2, shape, "full_shard", steps, cp=2))
        for name, step in (("1 process", one), ("2 processes, cp_size=2", cp)):
            print(f"{seq:>10}  {name:<22}{1000 * step:>10.0f}{seq / step:>10.0f}{one / step:>10.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-cp", action="store_true")
    p.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-type", default="full_shard", help=argparse.SUPPRESS)
    p.add_argument("--pp-schedule", default="", help=argparse.SUPPRESS)
    p.add_argument("--pp-microbatches", type=int, default=0, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        return worker(opts)

    print(f"CPU cores: {os.cpu_count()}, one OMP thread per process, gloo over loopback; load average before: "
          f"{os.getloadavg()[0]:.1f} (other processes on these cores slow every row down)")
    if not opts.skip_throughput:
        s = THROUGHPUT
        print(f"\nthroughput: dim {s['dim']}, {s['n_layers']} layers, vocab {s['vocab_size']}, batch {s['batch']} x "
              f"seq {s['seq']} per process, median of {opts.steps} steps")
        one = launch(1, s, "full_shard", opts.steps)[0]["tok_per_s"]
        print(f"{'layout':<26}{'tok/s per process':>20}{'total tok/s':>14}{'scaling efficiency':>21}")
        print(f"{'1 process':<26}{one:>20.0f}{one:>14.0f}{'1.00':>21}")
        for fsdp_type in ("full_shard", "no_shard"):
            ranks = launch(2, s, fsdp_type, opts.steps)
            per = [r["tok_per_s"] for r in ranks]
            total = sum(per)
            print(f"{'2 processes ' + fsdp_type:<26}{statistics.mean(per):>20.0f}{total:>14.0f}"
                  f"{total / (2 * one):>21.2f}")
            comm = statistics.mean(r["allreduce_s"] for r in ranks)
            step = statistics.mean(r["step_s"] for r in ranks)
        print(f"one fp32 all-reduce of all gradients ({ranks[0]['n_params'] / 1e6:.1f}M) takes {1000 * comm:.0f} ms "
              f"of a {1000 * step:.0f} ms step ({100 * comm / step:.0f}%): with 2 processes on 2 cores the "
              "limit is cores, not communication")
    if not opts.skip_pipeline:
        pipeline_rows(opts.steps)
    if not opts.skip_cp:
        context_rows(opts.steps)
    if not opts.skip_memory:
        s = MEMORY
        print(f"\nmemory per rank: dim {s['dim']}, {s['n_layers']} layers, vocab {s['vocab_size']}, 2 processes, "
              f"fp32 + AdamW, batch {s['batch']} x seq {s['seq']}")
        print(f"{'layout':<14}{'params':>10}{'grads':>10}{'AdamW':>10}{'sum (MB)':>10}{'peak RSS (MB)':>16}")
        for fsdp_type in ("full_shard", "no_shard"):
            ranks = launch(2, s, fsdp_type, 2)
            for r in ranks:
                total = r["param_mb"] + r["grad_mb"] + r["optim_mb"]
                print(f"{fsdp_type + ' r' + str(r['rank']):<14}{r['param_mb']:>10.0f}{r['grad_mb']:>10.0f}"
                      f"{r['optim_mb']:>10.0f}{total:>10.0f}{r['peak_rss_mb']:>16.0f}")
        print(f"({ranks[0]['n_params'] / 1e6:.0f}M parameters; full_shard holds 1/2 of params, grads and AdamW state "
              "per rank between steps, plus one block's full parameters while it computes)")


def pipeline_rows(steps: int) -> None:
    s = THROUGHPUT
    print(f"\npipeline: the same model, 2 processes, pp_size=2, batch {s['batch']} x seq {s['seq']}, median of "
          f"{steps} steps")
    print(f"{'schedule':<18}{'microbatches':>13}{'tok/s':>8}{'bubble measured':>17}{'theory (p-1)/(vm+p-1)':>23}")
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
        for m in (2, 4, 8):
            ranks = launch(2, s, "full_shard", steps, schedule, m)
            p = 2  # pipeline ranks
            print(f"{schedule:<18}{m:>13}{ranks[0]['tok_per_s']:>8.0f}"
                  f"{statistics.mean(r['bubble'] for r in ranks):>17.2f}{(p - 1) / (v * m + p - 1):>23.2f}")


if __name__ == "__main__":
    main()
