"""Curves from run directories: `python -m lingua.plot RUN_DIR [RUN_DIR ...] [--out DIR] [--smooth 0.9] [--x both]`.

Reads each run's metrics.jsonl (train rows) and metrics.eval.jsonl (eval rows) and writes PNG figures with the runs
overlaid, one colour per run: loss (training loss raw and smoothed, validation loss and bits-per-byte per source),
learning rate, throughput (tok/s and MFU), and for mixture-of-experts runs the expert load balance, each against steps and/or tokens seen (`--x step|tokens|both`).

A new figure is one `plot_*(runs, x, smooth) -> Figure | None` function added to FIGURES (None: nothing to draw);
a new file of rows (e.g. `probe/*.jsonl`) is one more field on Run, filled in `load_run`.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lingua.errors import LinguaError, print_error, require

X_KEYS = {"step": "step", "tokens": "tokens_seen", "time": "train_s"}
X_LABELS = {"step": "step", "tokens": "tokens seen", "time": "training time (s)"}
SOURCE_STYLES = ("-", "--", ":", "-.")


@dataclass
class Run:
    name: str  # legend label: config.yaml `name`, else the directory name
    train: list[dict]  # metrics.jsonl rows, one per step (last occurrence kept), sorted by step
    evals: list[dict] = field(default_factory=list)  # metrics.eval.jsonl rows, same rules


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def dedup_rows(rows: list[dict], key: str = "step") -> list[dict]:
    """One row per `key`, the last occurrence winning (a resumed run re-logs the steps after its checkpoint)."""
    last = {row[key]: row for row in rows if row.get(key) is not None}
    return [last[k] for k in sorted(last)]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file; an unterminated last line (a run still writing it) is skipped."""
    lines = path.read_text().split("\n")[:-1]  # the last piece is "" or an unterminated line
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LinguaError(f"{path}:{i}: not a JSON object ({e.msg})") from None
    return rows


def run_name(run_dir: Path) -> str:
    """config.yaml's top-level `name`, else the directory name."""
    import yaml  # comes with omegaconf

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):  # missing or malformed: it only costs the label
        config = None
    name = config.get("name") if isinstance(config, dict) else None
    return str(name) if name else run_dir.resolve().name


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise LinguaError(f"no metrics.jsonl in '{run_dir}': is it a run's dump_dir?")
    evals = run_dir / "metrics.eval.jsonl"
    return Run(
        name=run_name(run_dir),
        train=dedup_rows(read_jsonl(metrics)),
        evals=dedup_rows(read_jsonl(evals)) if evals.is_file() else [],
    )


def unique_names(runs: list[Run], dirs: list[Path]) -> None:
    """Runs sharing a name (e.g. the default 'lingua') get their directory appended, so the legend tells them apart."""
    names = [r.name for r in runs]
    for run, d in zip(runs, dirs):
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({Path(d).resolve().name})"


# ---------------------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------------------


def smooth(values: list[float], factor: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's slider): s_t = sum_i (1-f) f^(t-i) v_i / (1 - f^(t+1)).

    Debiasing keeps the first points on the data instead of pulled towards 0; factor 0 returns the values.
    """
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = factor * acc + (1 - factor) * v
        weight = factor * weight + (1 - factor)
        out.append(acc / weight if weight else v)
    return out


def series(rows: list[dict], x: str, key: str) -> tuple[list[float], list[float]]:
    """(xs, ys) for `key` against axis `x`, skipping missing or null values (nan/inf are logged as null)."""
    xk = X_KEYS[x]
    pts = [(r[xk], r[key]) for r in rows if r.get(xk) is not None and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def eval_sources(runs: list[Run], metric: str) -> list[str]:
    """Sources with a `<source>/<metric>` key in any run's eval rows, in first-seen order."""
    found = {}
    for run in runs:
        for row in run.evals:
            for k in row:
                if k.endswith("/" + metric):
                    found[k[: -len(metric) - 1]] = None
    return list(found)


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def _figure(n_panels: int, x: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4), squeeze=False)
    for ax in axes[0]:
        ax.set_xlabel(X_LABELS[x])
        ax.grid(alpha=0.3)
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
    return fig, list(axes[0])


def plot_train_metric(ax, runs: list[Run], x: str, key: str, smooth_factor: float = 0.0, scale: float = 1.0) -> None:
    """One line per run; with smoothing, the raw values faint underneath the smoothed ones."""
    for i, run in enumerate(runs):
        xs, ys = series(run.train, x, key)
        ys = [y * scale for y in ys]
        if smooth_factor > 0:
            ax.plot(xs, ys, color=f"C{i % 10}", alpha=0.25, linewidth=0.8)
            ys = smooth(ys, smooth_factor)
        ax.plot(xs, ys, color=f"C{i % 10}", label=run.name)


def plot_eval_metric(ax, runs: list[Run], x: str, metric: str) -> None:
    """One line per (run, source): colour is the run, line style the source."""
    for s, source in enumerate(eval_sources(runs, metric)):
        for i, run in enumerate(runs):
            xs, ys = series(run.evals, x, f"{source}/{metric}")
            if xs:
                ax.plot(xs, ys, color=f"C{i % 10}", linestyle=SOURCE_STYLES[s % len(SOURCE_STYLES)], marker="o",
                        markersize=3, label=f"{run.name} · {source}")


def plot_loss(runs: list[Run], x: str, smooth_factor: float):
    metrics = [m for m in ("nll", "bpb") if eval_sources(runs, m)]
    fig, axes = _figure(1 + len(metrics), x)
    title = f"training loss (EMA {smooth_factor})" if smooth_factor > 0 else "training loss"
    plot_train_metric(axes[0], runs, x, "loss", smooth_factor)
    axes[0].set(title=title, ylabel="loss (nats/token)")
    labels = {"nll": ("validation loss", "nll (nats/token)"), "bpb": ("validation bits per byte", "bits/byte")}
    for ax, metric in zip(axes[1:], metrics):
        plot_eval_metric(ax, runs, x, metric)
        ax.set(title=labels[metric][0], ylabel=labels[metric][1])
    return fig


def plot_lr(runs: list[Run], x: str, smooth_factor: float):
    fig, (ax,) = _figure(1, x)
    plot_train_metric(ax, runs, x, "lr")
    ax.set(title="learning rate", ylabel="lr")
    return fig


def plot_throughput(runs: list[Run], x: str, smooth_factor: float):
    fig, (tok, mfu) = _figure(2, x)
    plot_train_metric(tok, runs, x, "tok_per_s", smooth_factor)
    tok.set(title="throughput", ylabel="tokens/s (all ranks)")
    plot_train_metric(mfu, runs, x, "mfu", smooth_factor, scale=100.0)
    mfu.set(title="model FLOPs utilisation", ylabel="MFU (%)")
    return fig


def plot_moe_load(runs: list[Run], x: str, smooth_factor: float):
    """Mixture-of-experts runs (apps/moe): each layer's max/mean tokens per expert (1 = balanced; colour the run,
    line style the layer) and the load-balancing loss. None when no run logged `moe/imbalance/<layer>`."""
    layers = sorted({int(k.rsplit("/", 1)[1]) for run in runs for row in run.train for k in row
                     if k.startswith("moe/imbalance/")})
    if not layers:
        return None
    fig, (load, aux) = _figure(2, x)
    for i, run in enumerate(runs):
        for layer in layers:
            xs, ys = series(run.train, x, f"moe/imbalance/{layer}")
            if xs:
                load.plot(xs, ys, color=f"C{i % 10}", linestyle=SOURCE_STYLES[layer % len(SOURCE_STYLES)],
                          label=f"{run.name} · layer {layer}")
    load.axhline(1.0, color="grey", linewidth=0.8)
    load.set(title="expert load balance", ylabel="max / mean tokens per expert")
    plot_train_metric(aux, runs, x, "moe/aux_loss", smooth_factor)
    aux.set(title="load-balancing loss (unweighted)", ylabel="E * sum f_i P_i (1 = balanced)")
    return fig


FIGURES = {"loss": plot_loss, "lr": plot_lr, "throughput": plot_throughput, "moe_load": plot_moe_load}


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), or one line naming the extra."""
    require("matplotlib", "plot").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_runs(runs: list[Run], out: str | Path, xs: list[str], smooth_factor: float = 0.9) -> list[Path]:
    """Write every figure of FIGURES against each x axis to `out/<figure>_<x>.png`; returns the paths written."""
    _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for x in xs:
        for name, make in FIGURES.items():
            fig = make(runs, x, smooth_factor)
            if fig is None:
                continue
            for ax in fig.axes:
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize="small")
            written.append(_save(fig, out / f"{name}_{x}.png"))
    return written


# ---------------------------------------------------------------------------------------------------------
# Probe records (written by lingua.train.probe)
# ---------------------------------------------------------------------------------------------------------


def read_probe(run_dir, rank: int = 0) -> list[dict]:
    """The records of `<run_dir>/probe/probe_rank<rank>.jsonl`, one per (step, layer, kind), the last write winning
    (a resumed run probes its steps again); an unterminated last line (a run still writing) is skipped."""
    path = Path(run_dir) / "probe" / f"probe_rank{rank}.jsonl"
    if not path.is_file():
        return []
    last = {}
    lines = path.read_text().split("\n")[:-1]
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise LinguaError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        last[(r["step"], r["layer"], r["kind"])] = r
    return sorted(last.values(), key=lambda r: r["step"])


def plot_probes(run_dirs: list, out_dir) -> list[Path]:
    """`plot_probe` for each run that has probe records; with several runs, files are prefixed by the run's folder
    name. What lingua.tools.plot calls."""
    written = []
    for d in run_dirs:
        written += plot_probe(d, out_dir, prefix=f"{Path(d).resolve().name}_" if len(run_dirs) > 1 else "")
    return written


def plot_probe(run_dir, out_dir, prefix: str = "") -> list[Path]:
    """One figure per kind found in rank 0's records, `<out_dir>/<prefix>probe_<kind>.png`: std, max |x| and outlier
    share against the step, one line per layer coloured by depth; and `<prefix>probe_overhead.png` (the probe's ms per
    probed step). Returns the paths written (none when the run has no probe records)."""
    records = read_probe(run_dir)
    if not records:
        return []
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    titles = {"activation": "block outputs", "weight": "weights", "grad": "gradients"}  # the kinds lingua.train.probe writes
    for kind in titles:
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        layers = list(dict.fromkeys(r["layer"] for r in rows))  # model order, as written
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        cmap = plt.get_cmap("viridis")
        for j, layer in enumerate(layers):
            mine = [r for r in rows if r["layer"] == layer]
            steps = [r["step"] for r in mine]
            colour = cmap(j / max(len(layers) - 1, 1))
            for ax, stat in zip(axes, ("std", "max_abs", "outlier_share")):
                ax.plot(steps, [r[stat] for r in mine], color=colour, marker="o", markersize=2, linewidth=1,
                        label=layer)
        for ax, (stat, label) in zip(axes, (("std", "std"), ("max_abs", "max |x|"),
                                            ("outlier_share", "share of |x - mean| > k std"))):
            ax.set(xlabel="step", ylabel=label, title=f"{titles[kind]}: {label}")
            ax.grid(alpha=0.3)
            if stat != "outlier_share":
                ax.set_yscale("log")
        if len(layers) <= 12:
            axes[-1].legend(fontsize="x-small")
        else:
            axes[-1].text(0.01, 0.99, f"{len(layers)} tensors, {layers[0]} (purple) .. {layers[-1]} (yellow)",
                          transform=axes[-1].transAxes, va="top", fontsize="x-small")
        written.append(_save(fig, out / f"{prefix}probe_{kind}.png"))
    timing = [r for r in records if r["kind"] == "probe"]
    if timing:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        steps = [r["step"] for r in timing]
        ax.plot(steps, [r["hook_ms"] for r in timing], marker="o", label="activation hooks")
        ax.plot(steps, [r["stats_ms"] for r in timing], marker="o", label="weights + grads + write")
        ax.set(xlabel="step", ylabel="ms", title="probe cost per probed step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        written.append(_save(fig, out / f"{prefix}probe_overhead.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lingua.plot", description="Plot training curves of one or more runs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder (default: <first run>/plots)")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA factor for train curves in [0, 1); 0 = none")
    p.add_argument("--x", choices=("step", "tokens", "time", "both"), default="both",
                   help="x axis: step, tokens, time (training seconds), or both step and tokens (default)")
    args = p.parse_args(argv)
    try:
        if not 0 <= args.smooth < 1:
            raise LinguaError(f"--smooth must be in [0, 1), got {args.smooth}")
        runs = [load_run(d) for d in args.run_dirs]
        unique_names(runs, [Path(d) for d in args.run_dirs])
        xs = ["step", "tokens"] if args.x == "both" else [args.x]
        out = args.out or Path(args.run_dirs[0]) / "plots"
        written = plot_runs(runs, out, xs, args.smooth) + plot_probes(args.run_dirs, out)
    except LinguaError as e:
        return print_error(e)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
