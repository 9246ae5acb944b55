"""Plotting run directories (lingua/tools/plot.py): figures written and non-blank, EMA smoothing, resume dedup, bad input."""

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from lingua.errors import LinguaError
from lingua.tools.plot import (
    dedup_rows,
    load_run,
    main,
    plot_runs,
    smooth,
    unique_names,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, name=None, steps=50, seed=0, resume_at=None) -> Path:
    """A run's files as the train loop writes them; `resume_at` re-logs steps after it, as a resumed run does."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    if name:
        (run_dir / "config.yaml").write_text(f"name: {name}\nsteps: {steps}\noptim:\n  lr: 0.003\n")

    def train_row(step, offset=0.0):
        lr = 3e-3 * min(1.0, step / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        tok_per_s = 5000 * (1 + 0.1 * rng.gauss(0, 1))
        return {"step": step, "tokens_seen": 2048 * step, "loss": 3 + 7 * math.exp(-step / 12) + 0.2 * rng.gauss(0, 1)
                + offset, "lr": lr, "grad_norm": 1.0, "tok_per_s": tok_per_s, "mfu": tok_per_s / 1e5, "step_ms": 400.0,
                "data_ms": 4.0, "data_share": 0.01, "mem_gb": 0.5}

    rows = [train_row(s) for s in range(1, steps + 1)]
    if resume_at is not None:  # a first attempt logged 5 steps past its last checkpoint (stale, +100) and died
        rows[resume_at:resume_at] = [train_row(s, offset=100.0) for s in range(resume_at + 1, resume_at + 6)]
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(run_dir / "metrics.eval.jsonl", "w") as f:
        for step in range(10, steps + 1, 10):
            row = {"step": step, "tokens_seen": 2048 * step}
            for k, source in enumerate(("shakespeare", "code")):
                nll = 3.2 + k * 0.3 + 0.1 * seed + 6 * math.exp(-step / 12)
                row |= {f"{source}/nll": nll, f"{source}/ppl": math.exp(nll), f"{source}/bpb": nll / math.log(2) / 3.5,
                        f"{source}/tokens": 4096, f"{source}/bytes": 14336}
            f.write(json.dumps(row) + "\n")
    return run_dir


def test_cli_writes_readable_non_blank_pngs(tmp_path, capsys):
    matplotlib_image = pytest.importorskip("matplotlib.image")  # the 'plot' extra
    a = write_run(tmp_path / "a", name="baseline", resume_at=30)
    b = write_run(tmp_path / "b", seed=1)  # no config.yaml: labelled by its directory name
    out = tmp_path / "plots"
    assert main([str(a), str(b), "--out", str(out), "--smooth", "0.8"]) == 0

    printed = capsys.readouterr().out.split()
    expected = {f"{fig}_{x}.png" for fig in ("loss", "lr", "throughput") for x in ("step", "tokens")}
    assert {Path(p).name for p in printed} == expected
    for name in expected:
        path = out / name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5000, f"{name} is only {len(data)} bytes"
        pixels = matplotlib_image.imread(path)[..., :3]
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels.var() > 1e-3, f"{name} looks blank"


def test_default_out_and_single_axis(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "a")
    assert main([str(a), "--x", "tokens", "--smooth", "0"]) == 0
    assert sorted(p.name for p in (a / "plots").iterdir()) == ["loss_tokens.png", "lr_tokens.png",
                                                              "throughput_tokens.png"]


def test_smooth_matches_closed_form():
    rng = np.random.default_rng(0)
    values = rng.normal(size=40).tolist()
    f = 0.9
    for t, got in enumerate(smooth(values, f)):
        w = (1 - f) * f ** np.arange(t, -1, -1)  # weight of v_0 .. v_t
        assert got == pytest.approx(float(w @ values[: t + 1]) / (1 - f ** (t + 1)), rel=1e-12)
    assert smooth(values, 0.0) == values
    assert smooth([2.5] * 10, 0.99) == pytest.approx([2.5] * 10)  # debiased: no pull towards 0 at the start


def test_dedup_keeps_last_occurrence(tmp_path):
    rows = [{"step": 1, "v": "a"}, {"step": 2, "v": "b"}, {"step": 3, "v": "c"}, {"step": 2, "v": "B"},
            {"step": 3, "v": "C"}, {"step": 4, "v": "D"}]
    assert [r["v"] for r in dedup_rows(rows)] == ["a", "B", "C", "D"]

    run = load_run(write_run(tmp_path / "r", name="resumed", resume_at=30))
    assert [r["step"] for r in run.train] == list(range(1, 51))
    assert all(r["loss"] < 50 for r in run.train)  # steps 31..35 come from the resumed attempt, not the stale one
    assert run.name == "resumed" and len(run.evals) == 5


def test_run_names_and_partial_last_line(tmp_path):
    a = write_run(tmp_path / "a", name="lingua")
    b = write_run(tmp_path / "b", name="lingua")
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 51, "loss"')  # a run still writing its next line
    runs = [load_run(a), load_run(b)]
    assert len(runs[1].train) == 50
    unique_names(runs, [a, b])
    assert [r.name for r in runs] == ["lingua (a)", "lingua (b)"]


def test_bad_run_dir_is_one_line(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(LinguaError, match="not_a_run"):
        load_run(empty)
    assert main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not_a_run" in err and err.count("\n") == 1

    bad = write_run(tmp_path / "bad")
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(LinguaError, match=r"metrics.jsonl:2"):
        load_run(bad)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    run = load_run(write_run(tmp_path / "a"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(LinguaError, match=r"\.\[plot\]"):
        plot_runs([run], tmp_path / "out", ["step"])
