"""The README's published plans: each config at each world size, simulated once (lingua.plan) and priced on each GPU;
when the config as written does not fit an H100, the first re-planned change that fits is shown instead.

    python benchmarks/plan_table.py [--configs llama_1B llama_7B llama_70B moe/moe_8x1B] [--worlds 8 64 512]
        [--gpus h100 h200] [--set distributed.ep_size=8 ...]   (overrides applied to every config)

Prints the CPU it ran on, then one markdown row per (config, world, GPU) and the seconds each plan took (wall and
this process's CPU, the re-planned changes included).
"""

import argparse
import platform
import subprocess
import time

from lingua.args import load_config
from lingua.errors import LinguaError
from lingua.plan.__main__ import resolve_spec
from lingua.plan.plan import on_gpu, plan
from lingua.train.loop import train_args_cls


def config_path(config: str) -> str:
    """llama_7B -> apps/main/configs/llama_7B.yaml; moe/moe_8x1B -> apps/moe/configs/moe_8x1B.yaml."""
    app, _, name = config.rpartition("/")
    return f"apps/{app or 'main'}/configs/{name}.yaml"


def fitting(config: str, world: int, suggest: bool, overrides: tuple = ()):
    """(plan, the change it took as key=value text) for the config with `overrides` on `world` H100s."""
    spec = resolve_spec("", config_path(config))
    args = load_config(train_args_cls(spec), [f"config={config_path(config)}", *overrides])
    p = plan(args, spec, world, "h100", suggest=suggest)
    if p.fits or not p.suggestions:
        return p, " ".join(overrides) or "as written"
    change, q = next(((c, q) for c, q in p.suggestions if q.fits), p.suggestions[-1])
    return q, " ".join([*overrides, *(f"{k}={v}" for k, v in change.items())])


def row(config: str, p, change: str, gpu: str) -> str:
    q = on_gpu(p, resolve_spec("", config_path(config)), gpu)
    t = q.roles[0].time
    m, ep = q.mesh, q.args.distributed.ep_size
    return (f"| {config} | {q.world_size} x {gpu.upper()} | dp {m.dp_replicate * m.dp_shard} x tp {m.tp}"
            f"{f' (ep {ep})' if ep > 1 else ''} ({change}) | "
            f"{q.peak_gib:.1f} / {q.gpu.hbm_gib:.0f}{'' if q.fits else ' (does not fit)'} | "
            f"{t.tok_per_s_gpu:,.0f} | {100 * t.mfu:.1f}% |")


def cpu_name() -> str:
    """lscpu's model name, else what Python knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    return name or platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["llama_1B", "llama_7B", "llama_70B", "moe/moe_8x1B"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[8, 64, 512])
    ap.add_argument("--gpus", nargs="+", default=["h100", "h200"])
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides for every config")
    opts = ap.parse_args()
    print(f"<!-- planned on: {cpu_name()} -->")
    print("| config | GPUs | parallelism | GiB per GPU (peak / HBM) | tok/s/GPU | MFU |\n|---|---|---|---|---|---|")
    for config in opts.configs:
        for world in opts.worlds:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                p, change = fitting(config, world, suggest=True, overrides=tuple(opts.set))
            except LinguaError as e:
                print(f"| {config} | {world} | {e} | | | |", flush=True)
                continue
            for gpu in opts.gpus:
                print(row(config, p, change, gpu), flush=True)
            print(f"<!-- {config} @ {world}: planned in {time.perf_counter() - start:.1f} s "
                  f"({time.process_time() - cpu:.1f} s of CPU) -->", flush=True)


if __name__ == "__main__":
    main()
