"""Training throughput of the debug shape in each mode, through the real train loop, against a plain PyTorch loop.

    python benchmarks/train_throughput.py [--steps 12] [--modes fp32-eager,fp32-compile,...] [key=value ...]

For every mode it prints tok/s, achieved model FLOP/s, MFU against a matmul calibration of the same dtype measured in
this process, and the share of step time spent waiting for data. Modes whose dtype this CPU does not run natively (bf16
on an AVX2-only CPU is ~30x slower) run 2 steps only and are marked "emulated". Needs data/ and tokenizers/ from
setup/prepare_data.py and setup/train_tokenizer.py (or data.*/model.* overrides pointing elsewhere).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua.spec import TRANSFORMER_SPEC  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.metrics import calibrate_matmul  # noqa: E402
from lingua.precision import cpu_bf16_features  # noqa: E402
from lingua.train import TrainArgs, train  # noqa: E402
from lingua.transformer import Transformer, flops_per_token  # noqa: E402

MODES = {
    "fp32-eager": {"distributed.model_dtype": "fp32", "distributed.compile": False, "optim.fused": True},
    "fp32-eager-unfused": {"distributed.model_dtype": "fp32", "distributed.compile": False, "optim.fused": False},
    "fp32-compile": {"distributed.model_dtype": "fp32", "distributed.compile": True, "optim.fused": True},
    "bf16-eager": {"distributed.model_dtype": "bf16", "distributed.compile": False, "optim.fused": True},
    "bf16-compile": {"distributed.model_dtype": "bf16", "distributed.compile": True, "optim.fused": True},
}


def run_mode(name: str, steps: int, overrides: list[str]) -> dict:
    native_bf16 = bool(cpu_bf16_features()) or torch.cuda.is_available()
    emulated = MODES[name]["distributed.model_dtype"] == "bf16" and not native_bf16
    n = 2 if emulated else steps
    with tempfile.TemporaryDirectory() as tmp:
        argv = [f"config={ROOT}/apps/main/configs/debug.yaml", f"dump_dir={tmp}", f"steps={n}",
                "logging.freq=1", "logging.progress=false", "checkpoint.dump.every=0", "eval.at_end=false",
                "logging.peak_flops=1e12", "optim.warmup=0"]
        argv += [f"{k}={v}" for k, v in MODES[name].items()] + overrides
        cfg = load_config(TrainArgs, argv)
        train(cfg, TRANSFORMER_SPEC)
        rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
    warm = rows[1:] if len(rows) > 2 else rows[-1:]  # the first step pays for compilation and allocator warm-up
    step_s = statistics.median(r["step_ms"] for r in warm) / 1000
    tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.grad_acc_steps
    dtype = torch.bfloat16 if MODES[name]["distributed.model_dtype"] == "bf16" else torch.float32
    peak, _ = calibrate_matmul(dtype, time_box_s=1.0)
    model_flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / step_s
    return {"mode": name + (" (emulated)" if emulated else ""), "tok_per_s": tokens / step_s,
            "model_tflops": model_flops / 1e12, "peak_tflops": peak / 1e12, "mfu": model_flops / peak,
            "data_share": statistics.median(r["data_ms"] / r["step_ms"] for r in warm)}


def plain_loop(steps: int, overrides: list[str]) -> dict:
    """The best plain PyTorch loop for the same model: fused AdamW, fp32, no loader, no logging, no checkpoints."""
    cfg = load_config(TrainArgs, [f"config={ROOT}/apps/main/configs/debug.yaml"] + overrides)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    B, S = cfg.data.batch_size, cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (B, S + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    peak, _ = calibrate_matmul(torch.float32, time_box_s=1.0)
    model_flops = flops_per_token(cfg.model, S) * B * S / step_s
    return {"mode": "plain PyTorch loop (fp32)", "tok_per_s": B * S / step_s, "model_tflops": model_flops / 1e12,
            "peak_tflops": peak / 1e12, "mfu": model_flops / peak, "data_share": 0.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--modes", default=",".join(MODES))
    args, overrides = parser.parse_known_args()
    rows = [plain_loop(args.steps, overrides)]
    for name in args.modes.split(","):
        rows.append(run_mode(name, args.steps, overrides))
        print(f"  done: {rows[-1]['mode']}", flush=True)
    base = rows[0]["tok_per_s"]
    print(f"\n{'mode':32s} {'tok/s':>9s} {'model TFLOP/s':>14s} {'matmul peak':>12s} {'MFU':>6s} {'data wait':>10s} {'vs plain':>9s}")
    for r in rows:
        print(f"{r['mode']:32s} {r['tok_per_s']:9.0f} {r['model_tflops']:14.4f} {r['peak_tflops']:12.4f} "
              f"{100 * r['mfu']:5.1f}% {100 * r['data_share']:9.1f}% {r['tok_per_s'] / base:8.2f}x")


if __name__ == "__main__":
    main()
