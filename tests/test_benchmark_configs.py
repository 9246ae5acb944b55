"""The benchmarks' recipes and modes are overrides of apps/main/configs/debug.yaml: each must load (no unknown key or
bad value) and must change the configuration it claims to change, or its row in the README measures the default
again under another name."""

import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import time_to_quality, train_throughput  # noqa: E402
from lingua.distributed.precision import cpu_name  # noqa: E402


def settings(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("dump_dir"), d.pop("name")
    return d


@pytest.mark.parametrize("recipe", sorted(time_to_quality.RECIPES))
def test_each_time_to_quality_recipe_loads_and_differs_from_the_debug_config(recipe, tmp_path):
    cfg = time_to_quality.config(recipe, tmp_path, [])
    assert cfg.name == recipe
    base = settings(time_to_quality.config("debug", tmp_path, []))
    assert (settings(cfg) == base) == (recipe == "debug")


@pytest.mark.parametrize("mode", sorted(train_throughput.LINGUA_MODES))
def test_each_throughput_mode_loads_and_only_default_is_the_default(mode, tmp_path):
    cfgs = {s: train_throughput.lingua_config(s, mode, str(tmp_path), 5, []) for s in train_throughput.SHAPES}
    base = settings(train_throughput.lingua_config("debug", "default", str(tmp_path), 5, []))
    assert (settings(cfgs["debug"]) == base) == (mode == "default")
    assert cfgs["issue13"].data.seq_len == 512


def test_cpu_name_names_a_cpu():
    assert cpu_name().strip()


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_at_its_smoke_shape_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh is run only when a GPU is lent: its CPU dry run keeps it from rotting in between."""
    import os
    import subprocess

    if not (ROOT / "tokenizers" / "shakespeare_sp4096.model").exists():
        pytest.skip("needs the shakespeare corpus and tokenizer (setup/run_tests.sh prepares them)")
    env = dict(os.environ, SMOKE="1", STEPS="3", PY=sys.executable, OUT=str(tmp_path))
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "attention_report.txt").read_text()
    assert "bfloat16" in report and "(1,4,256,64)" in report  # the smoke shape's attention, in bf16
    result = (tmp_path / "train_throughput.txt").read_text()
    assert "config: default lingua / best plain" in result and "where the step time goes" in result
