"""What a checkpoint save costs the training loop, synchronous vs checkpoint.async_save.

    python benchmarks/checkpoint_save.py [--dim 512] [--layers 8] [--rounds 3] [--steps 6]

One process builds a transformer (AdamW state included: ~3x the weights on disk), then per mode and round: trains
--steps steps, saves, trains --steps more. It reports the median time the loop is blocked by `save()` (async: the
staging copy, pinned and non-blocking on CUDA), by the `wait()` that completes it (async: COMPLETE and the small
train state; the shards were hashed in the background), the extra wall time of the --steps steps right after the
save (an async write runs next to them, so they may slow down), and the time until the checkpoint is complete. Sync and async rounds are interleaved so that other
load on the machine affects both alike.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lingua.checkpoint.manager import CheckpointArgs, CheckpointManager
from lingua.models.decoder import materialize
from lingua.models.transformer.model import Transformer, TransformerArgs


def _steps(model, opt, n, args):
    t0 = time.perf_counter()
    for _ in range(n):
        x = torch.randint(0, args.vocab, (4, 64))
        model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    with torch.device("meta"):
        model = Transformer(TransformerArgs(dim=args.dim, n_layers=args.layers, n_heads=8, vocab_size=args.vocab,
                                            max_seqlen=64))
    model = materialize(model, torch.device("cpu"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _steps(model, opt, 2, args)  # AdamW state exists from here on
    n_params = sum(p.numel() for p in model.parameters())
    rows = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in rows:
                mgr = CheckpointManager(CheckpointArgs(async_save=mode == "async"), f"{tmp}/{mode}{r}")
                base = _steps(model, opt, args.steps, args)
                t0 = time.perf_counter()
                mgr.save(r + 1, model, opt, {"step": r + 1}, {}, wait=False)
                blocked = time.perf_counter() - t0
                after = _steps(model, opt, args.steps, args)
                t1 = time.perf_counter()
                mgr.wait()
                done = time.perf_counter()
                rows[mode].append((blocked, done - t1, after - base, done - t0))
        size = sum(f.stat().st_size for f in Path(f"{tmp}/sync0").rglob("*") if f.is_file())
    print(f"{n_params / 1e6:.1f}M parameters, {size / 1e6:.0f} MB per checkpoint, median of {args.rounds} rounds")
    print("| mode | loop blocked by save() | by wait() | extra time of the next steps | until COMPLETE |")
    print("| --- | --- | --- | --- | --- |")
    for mode, vals in rows.items():
        blocked, waited, extra, total = (statistics.median(v[i] for v in vals) for i in range(4))
        print(f"| {mode} | {1000 * blocked:.0f} ms | {1000 * waited:.0f} ms | {1000 * extra:.0f} ms | "
              f"{1000 * total:.0f} ms |")


if __name__ == "__main__":
    main()
