"""Training throughput of lingua's real train loop against a plain nanoGPT-style loop of the same shape, in one run.

    python benchmarks/train_throughput.py [--steps 10] [--repeats 2] [--shapes debug,issue13] [key=value ...]
    python benchmarks/train_throughput.py --shapes config config=apps/main/configs/llama_1B.yaml [key=value ...]

For each shape it runs every mode of lingua (`apps.main.train`'s loop with the real data loader; "default" is what a
user gets without flags: model_dtype auto, compile auto, the async loader; "default-plain-arch" is the default with
the plain GPT's architecture choices, to compare the step machinery alone) and every mode of the plain loop
(benchmarks/plain_gpt.py: fixed random batch, fused AdamW, compile and bf16 autocast as options), interleaved over
--repeats rounds so that a noisy machine slows all of them alike, then prints tok/s, model FLOP/s, MFU against this
run's matmul peak of the mode's dtype, the data loader's share of the step, and each mode's ratio to the best plain
mode; then where the time of lingua's default step and of the best plain step goes (torch.profiler over a few steps
of one more run each, lingua.train.profiling.time_breakdown: matmuls, attention, compiled kernels, optimizer, the rest). Modes whose dtype this CPU only emulates (bf16 without AMX/AVX512-BF16, ~30x slower) run 2 steps and are
marked "emulated". Needs data/ and tokenizers/ (setup/prepare_data.py, setup/train_tokenizer.py). `config=` picks
the base config (default apps/main/configs/debug.yaml; shape "config" runs it unchanged). On a CUDA GPU both loops
run there and MFU is against the GPU's table peak (lingua.train.metrics.peak_flops); benchmarks/gpu_check.sh is the
prepared one-GPU run.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.plain_gpt import GPT, GPTConfig, train_steps  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.distributed.precision import cpu_bf16_features, cpu_name  # noqa: E402
from lingua.models.transformer.spec import TRANSFORMER_SPEC  # noqa: E402
from lingua.models.transformer.model import flops_per_token  # noqa: E402
from lingua.train.loop import TrainArgs, train  # noqa: E402
from lingua.train.metrics import calibrate_matmul, peak_flops  # noqa: E402
from lingua.train.profiling import TIME_CATEGORIES, time_breakdown  # noqa: E402

# Overrides of apps/main/configs/debug.yaml. Both loops step fused AdamW: the debug recipe's Muon (about 35% more
# FLOPs a step at 2k tokens, lingua/train/muon.py) is an algorithm choice, not a mode of the step machinery measured here.
SAME_OPTIMIZER = ["optim.name=adamw"]
DEBUG_CONFIG = ROOT / "apps" / "main" / "configs" / "debug.yaml"
SHAPES = {
    "config": SAME_OPTIMIZER,  # the base config as it is (e.g. config=apps/main/configs/llama_1B.yaml on a GPU)
    "debug": SAME_OPTIMIZER,
    "issue13": SAME_OPTIMIZER + ["data.seq_len=512", "model.max_seqlen=512"],  # 4 layers, 4 heads, dim 256, batch 8
}
# The model switches the plain GPT does not have (QK-norm, the block-causal mask; and, set here in case a config turns
# them on, an untied head and the soft-cap's tanh over the logits): this mode turns them off to compare the step
# machinery alone.
PLAIN_ARCH = ["model.weight_tying=true", "model.mask=causal", "model.qk_norm=false", "model.logit_softcap=null"]
LINGUA_MODES = {
    "default": [],
    "default-plain-arch": PLAIN_ARCH,
    "default-sync-loader": ["data.load_async=false"],
    "fp32-eager": ["distributed.model_dtype=fp32", "distributed.compile=false"],
    "fp32-compile": ["distributed.model_dtype=fp32", "distributed.compile=true"],
    "bf16-eager": ["distributed.model_dtype=bf16", "distributed.compile=false"],
    "bf16-compile": ["distributed.model_dtype=bf16", "distributed.compile=true"],
}
PLAIN_MODES = {"fp32-eager": (torch.float32, False), "fp32-compile": (torch.float32, True),
               "bf16-eager": (torch.bfloat16, False), "bf16-compile": (torch.bfloat16, True)}


def native_bf16() -> bool:
    return bool(cpu_bf16_features()) or torch.cuda.is_available()


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def lingua_config(shape: str, mode: str, dump_dir: str, steps: int, extra: list[str]) -> TrainArgs:
    """The base config (`config=` among the overrides, else the debug one) with the shape's and the mode's overrides."""
    config = next((e.split("=", 1)[1] for e in extra if e.startswith("config=")), str(DEBUG_CONFIG))
    extra = [e for e in extra if not e.startswith("config=")]
    argv = [f"config={config}", f"dump_dir={dump_dir}", f"steps={steps}",
            "logging.freq=1", "logging.progress=false", "checkpoint.dump.every=0", "checkpoint.save_at_end=false", "eval.at_end=false",
            "eval.every=0", "logging.peak_flops=1e12", "optim.warmup=0"]
    return load_config(TrainArgs, argv + SHAPES[shape] + LINGUA_MODES[mode] + extra)


def run_lingua(shape: str, mode: str, steps: int, extra: list[str]) -> dict:
    """Step times (after the first two, which pay for compilation and warm-up) and the data wait of one run."""
    emulated = "bf16" in mode and not native_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lingua_config(shape, mode, tmp, 3 if emulated else steps, extra)
        train(cfg, TRANSFORMER_SPEC)
        rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
    warm = rows[2:] or rows[-1:]
    return {"step_s": [r["step_ms"] / 1000 for r in warm], "data_s": [r["data_ms"] / 1000 for r in warm],
            "tokens": cfg.data.batch_size * cfg.data.seq_len * cfg.grad_acc_steps, "cfg": cfg, "emulated": emulated}


def run_plain(cfg: TrainArgs, mode: str, steps: int) -> dict:
    dtype, compile = PLAIN_MODES[mode]
    emulated = dtype == torch.bfloat16 and not native_bf16()
    shape = GPTConfig(n_layer=cfg.model.n_layers, n_head=cfg.model.n_heads, n_embd=cfg.model.dim,
                      block_size=cfg.data.seq_len, vocab_size=cfg.model.vocab_size)
    times = train_steps(shape, cfg.data.batch_size, 3 if emulated else steps, dtype, compile, device=device())
    return {"step_s": times[2:] or times[-1:], "data_s": [0.0], "tokens": cfg.data.batch_size * cfg.data.seq_len,
            "emulated": emulated}


def breakdown_lingua(shape: str, mode: str, extra: list[str]) -> dict:
    """Where lingua's step time goes: one more run with its own profiler on (steps 4-8)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lingua_config(shape, mode, tmp, 8, extra + ["profiling.run=true", "profiling.profile_warmup=3",
                                                          "profiling.profile_steps=5"])
        train(cfg, TRANSFORMER_SPEC)
        return json.loads((Path(tmp) / "profiling" / "time_breakdown_rank00000.json").read_text())


def breakdown_plain(cfg: TrainArgs, mode: str) -> dict:
    """Where the plain loop's step time goes: the same profiler window (steps 4-8) over one more run."""
    dtype, compile = PLAIN_MODES[mode]
    shape = GPTConfig(n_layer=cfg.model.n_layers, n_head=cfg.model.n_heads, n_embd=cfg.model.dim,
                      block_size=cfg.data.seq_len, vocab_size=cfg.model.vocab_size)
    shares, cuda = {}, device() == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=0, warmup=3, active=5, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=lambda p: shares.update(
            time_breakdown(p.key_averages(), device_time=cuda))) as prof:
        train_steps(shape, cfg.data.batch_size, 8, dtype, compile, on_step=prof.step, device=device())
    return shares


def model_dtype(mode: str) -> torch.dtype:
    if "bf16" in mode:
        return torch.bfloat16
    if "fp32" in mode:
        return torch.float32
    return torch.bfloat16 if native_bf16() else torch.float32  # what model_dtype=auto picks


def bench_shape(shape: str, args, extra: list[str], peaks: dict) -> list[dict]:
    lingua_modes = [m for m in args.lingua_modes.split(",") if m]
    plain_modes = [m for m in args.plain_modes.split(",") if m]
    runs = {("lingua", m): [] for m in lingua_modes} | {("plain", m): [] for m in plain_modes}
    base_cfg = lingua_config(shape, "default", "unused", 1, extra)
    for r in range(args.repeats):
        for kind, mode in runs:
            result = run_plain(base_cfg, mode, args.steps) if kind == "plain" else run_lingua(shape, mode, args.steps,
                                                                                               extra)
            runs[(kind, mode)].append(result)
            print(f"  [{shape} round {r + 1}/{args.repeats}] {kind} {mode}: "
                  f"{result['tokens'] / statistics.median(result['step_s']):.0f} tok/s", flush=True)
    fpt_lingua = flops_per_token(base_cfg.model, base_cfg.data.seq_len)
    fpt_plain = GPT(GPTConfig(n_layer=base_cfg.model.n_layers, n_head=base_cfg.model.n_heads,
                              n_embd=base_cfg.model.dim, block_size=base_cfg.data.seq_len,
                              vocab_size=base_cfg.model.vocab_size)).flops_per_token(base_cfg.data.seq_len)
    rows = []
    for (kind, mode), results in runs.items():
        step_s = statistics.median([t for res in results for t in res["step_s"]])
        data_s = statistics.median([t for res in results for t in res["data_s"]])
        tok_s = results[0]["tokens"] / step_s
        flops = (fpt_lingua if kind == "lingua" else fpt_plain) * tok_s
        peak = peaks[model_dtype(mode)]
        rows.append({"shape": shape, "kind": kind, "mode": mode + (" (emulated)" if results[0]["emulated"] else ""),
                     "tok_per_s": tok_s, "step_ms": 1000 * step_s, "tflops": flops / 1e12, "mfu": flops / peak,
                     "data_share": data_s / step_s, "emulated": results[0]["emulated"]})
    best_plain = max((r for r in rows if r["kind"] == "plain" and not r["emulated"]), key=lambda r: r["tok_per_s"])
    for r in rows:
        r["vs_best_plain"] = r["tok_per_s"] / best_plain["tok_per_s"]
    if args.breakdown and "default" in lingua_modes:
        for r in rows:
            if r is best_plain or (r["kind"], r["mode"]) == ("lingua", "default"):
                r["breakdown"] = (breakdown_lingua(shape, "default", extra) if r["kind"] == "lingua"
                                  else breakdown_plain(base_cfg, r["mode"]))
    return rows


def print_table(rows: list[dict], peaks: dict) -> None:
    print(f"\n{'shape':8s} {'loop':6s} {'mode':26s} {'tok/s':>8s} {'ms/step':>8s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'data':>6s} {'vs best plain':>13s}")
    for r in rows:
        print(f"{r['shape']:8s} {r['kind']:6s} {r['mode']:26s} {r['tok_per_s']:8.0f} {r['step_ms']:8.0f} "
              f"{r['tflops']:8.4f} {100 * r['mfu']:5.1f}% {100 * r['data_share']:5.2f}% {r['vs_best_plain']:12.3f}x")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        default = next(r for r in mine if r["kind"] == "lingua" and r["mode"] == "default")
        best = max((r for r in mine if r["kind"] == "plain" and not r["emulated"]), key=lambda r: r["tok_per_s"])
        print(f"{shape}: default lingua / best plain ({best['mode']}) = {default['vs_best_plain']:.3f}x; "
              f"default MFU {100 * default['mfu']:.1f}% of the same-run matmul peak; data wait "
              f"{100 * default['data_share']:.2f}% of a step")
    with_breakdown = [r for r in rows if "breakdown" in r]
    if with_breakdown:
        names = [name for name, _ in TIME_CATEGORIES] + ["other"]
        print("\nwhere the step time goes (torch.profiler, self time of the ops, ms/step):")
        print(f"{'shape':8s} {'loop':6s} {'mode':26s} " + " ".join(f"{n:>16s}" for n in names))
        for r in with_breakdown:
            print(f"{r['shape']:8s} {r['kind']:6s} {r['mode']:26s} "
                  + " ".join(f"{r['breakdown'][n] * r['step_ms']:9.1f} ({100 * r['breakdown'][n]:2.0f}%)"
                             for n in names))


def measure_peaks() -> dict:
    """Per dtype, the FLOP/s MFU is against: a CPU's same-run 2048^3 matmul (or the largest that fits the time box),
    a GPU's table peak (dense, from its datasheet) with this run's 8192^3 matmul printed beside it."""
    if device() == "cuda":
        seen = calibrate_matmul(torch.bfloat16, torch.device("cuda"), size=8192, time_box_s=2.0)[0]
        peaks = {dt: peak_flops(torch.device("cuda"), dt)[0] or seen for dt in (torch.float32, torch.bfloat16)}
        return peaks | {"source": f"{torch.cuda.get_device_name()} table peaks; this run's 8192^3 bf16 matmul: "
                                  f"{seen / 1e12:.0f} TFLOP/s"}
    return {dt: calibrate_matmul(dt, size=2048, time_box_s=2.0)[0] for dt in (torch.float32, torch.bfloat16)} | {
        "source": "2048^3 or the largest that fits the time box, this run"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per run (the first two are not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all modes, interleaved")
    parser.add_argument("--shapes", default="debug,issue13")  # "config": the config= file as it is
    parser.add_argument("--lingua-modes", default=",".join(LINGUA_MODES))
    parser.add_argument("--plain-modes", default=",".join(PLAIN_MODES))
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the profiled runs of lingua's default and the best plain mode")
    args, extra = parser.parse_known_args()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {', '.join(cpu_bf16_features()) or 'no'}; torch {torch.__version__}", flush=True)
    if device() == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, CUDA "
              f"{torch.version.cuda}; both loops run on it", flush=True)
    peaks = measure_peaks()
    rows = [row for shape in args.shapes.split(",") for row in bench_shape(shape, args, extra, peaks)]
    print(f"\nmatmul peak ({peaks['source']}): fp32 {peaks[torch.float32] / 1e9:.1f} GFLOP/s, bf16 "
          f"{peaks[torch.bfloat16] / 1e9:.1f} GFLOP/s")
    print_table(rows, peaks)


if __name__ == "__main__":
    main()
