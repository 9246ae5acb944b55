"""Expert compute of the MoE (apps/moe): torch._grouped_mm against a loop of matmuls over the experts sorted by
expert, forward + backward, on this machine. The measurement behind model.grouped_mm=auto.

    python benchmarks/moe_dispatch.py [--tokens 8192] [--dim 256] [--hidden 384] [--experts 8,32] [--rounds 5]
        [--threads 1]

The rows (tokens x top_k slots, sorted by expert) are spread over the experts as a trained router spreads them
(Zipf-like: expert e gets a share ~ 1 / (e + 1)); both variants get the same rows and counts and are checked to
agree. Rounds interleave the two variants (a shared machine's load hits both alike); the median per variant is
reported in ms per forward + backward and the speed-up of grouped over loop.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.moe.model import GroupedExperts  # noqa: E402


def counts_for(n_rows: int, n_experts: int) -> torch.Tensor:
    share = 1.0 / torch.arange(1, n_experts + 1, dtype=torch.float64)
    counts = (share / share.sum() * n_rows).floor().long()
    counts[0] += n_rows - counts.sum()
    return counts


def time_variant(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, grouped: bool) -> float:
    experts.grouped_mm = "true" if grouped else "false"
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out = experts(x, counts)
    out.backward(torch.ones_like(out))
    return 1000 * (time.perf_counter() - t0)


def measure(n_rows: int, dim: int, hidden: int, n_experts: int, rounds: int) -> tuple[float, float]:
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts, dim, hidden)
    experts.init_weights(None, 1.0)
    x, counts = torch.randn(n_rows, dim), counts_for(n_rows, n_experts)
    experts.grouped_mm = "true"
    a = experts(x, counts)
    experts.grouped_mm = "false"
    b = experts(x, counts)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    times = {True: [], False: []}
    for r in range(rounds + 1):  # round 0 warms up
        for grouped in (True, False) if r % 2 else (False, True):
            t = time_variant(experts, x, counts, grouped)
            if r:
                times[grouped].append(t)
    return statistics.median(times[True]), statistics.median(times[False])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="token x top_k rows (debug config: 16 x 256 x 2)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--experts", default="8,32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), rows={a.tokens} dim={a.dim} hidden={a.hidden}")
    print("| experts | grouped_mm ms | loop ms | grouped speed-up |")
    print("|---|---|---|---|")
    for n in (int(e) for e in a.experts.split(",")):
        g, lp = measure(a.tokens, a.dim, a.hidden, n, a.rounds)
        print(f"| {n} | {g:.1f} | {lp:.1f} | {lp / g:.2f}x |")


if __name__ == "__main__":
    main()
