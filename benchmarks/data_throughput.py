"""Data loader throughput: tokens/s for sync and async loading with the bytes and sentencepiece tokenizers, compared
with what training consumes (the loader must never be the bottleneck: target >= 20x the training rate).

    python setup/prepare_data.py shakespeare --data_dir data
    python setup/train_tokenizer.py --data_dir data --source shakespeare
    python benchmarks/data_throughput.py --data_dir data --tokenizer tokenizers/shakespeare_sp4096.model

Each configuration first pays its start-up (async: spawning the worker; both: filling the shuffle buffer), reported
separately; the rate is measured on the batches after the first one. Async measures the consumer: the trainer's view.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from lingua.data import DataArgs, DataLoader  # noqa: E402
from lingua.tokenizer import TokenizerArgs  # noqa: E402
from lingua.errors import LinguaError  # noqa: E402

TARGET = 20.0


def measure(args: DataArgs, seconds: float, min_batches: int) -> tuple[float, float]:
    """(start-up seconds, steady tokens/s) of one loader configuration."""
    with DataLoader(args) as loader:
        t0 = time.perf_counter()
        next(loader)
        startup = time.perf_counter() - t0
        n, t0 = 0, time.perf_counter()
        while n < min_batches or time.perf_counter() - t0 < seconds:
            next(loader)
            n += 1
        elapsed = time.perf_counter() - t0
    return startup, n * args.batch_size * args.seq_len / elapsed


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--source", default="shakespeare")
    parser.add_argument("--tokenizer", default="tokenizers/shakespeare_sp4096.model", help="sentencepiece model")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--prefetch_size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per configuration")
    parser.add_argument("--train_tok_s", type=float, default=5000.0,
                        help="training tokens/s to compare with (default: the debug model on one CPU core)")
    a = parser.parse_args(argv)

    tokenizers = [TokenizerArgs("bytes")]
    if os.path.isfile(a.tokenizer):
        tokenizers.append(TokenizerArgs("sp", a.tokenizer))
    else:
        print(f"note: no sentencepiece model at {a.tokenizer} (run setup/train_tokenizer.py): measuring bytes only")
    print(f"loader throughput on {a.data_dir}/{a.source}: batch_size={a.batch_size} seq_len={a.seq_len} "
          f"prefetch_size={a.prefetch_size}, {os.cpu_count()} CPUs")
    print(f"{'tokenizer':>10} {'mode':>6} {'start-up s':>10} {'tokens/s':>12} {'x training':>11}")
    rows = []
    for tok in tokenizers:
        for load_async in (False, True):
            args = DataArgs(root_dir=a.data_dir, sources={a.source: 1.0}, batch_size=a.batch_size,
                            seq_len=a.seq_len, prefetch_size=a.prefetch_size, load_async=load_async, tokenizer=tok)
            startup, rate = measure(args, a.seconds, min_batches=2 * a.prefetch_size)
            mode = "async" if load_async else "sync"
            rows.append({"tokenizer": tok.name, "mode": mode, "startup_s": startup, "tok_s": rate})
            print(f"{tok.name:>10} {mode:>6} {startup:>10.2f} {rate:>12,.0f} {rate / a.train_tok_s:>10.0f}x",
                  flush=True)
    worst = min(rows, key=lambda r: r["tok_s"])
    ratio = worst["tok_s"] / a.train_tok_s
    verdict = "OK" if ratio >= TARGET else "BELOW TARGET: the loader could slow training"
    print(f"slowest ({worst['tokenizer']}, {worst['mode']}): {worst['tok_s']:,.0f} tok/s = {ratio:.0f}x the training "
          f"rate of {a.train_tok_s:,.0f} tok/s (target >= {TARGET:.0f}x): {verdict}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except LinguaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
