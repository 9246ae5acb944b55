"""Config precedence, round trips and one-line errors (lingua/args.py)."""

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest

from lingua.args import dump_config, load_config
from lingua.errors import ConfigError


@dataclass
class OptimCfg:
    lr: float = 1e-3
    scheduler: str = "cosine"


@dataclass
class DataCfg:
    sources: dict[str, float] = field(default_factory=dict)
    batch_size: int = 2
    path: Optional[str] = None


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "steps: 20\noptim:\n  lr: 0.5\ndata:\n  sources:\n    a: 1.0\n")
    assert load_config(Cfg, []).steps == 10
    cfg = load_config(Cfg, [f"config={path}"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.sources, cfg.optim.scheduler) == (20, 0.5, {"a": 1.0}, "cosine")
    cfg = load_config(Cfg, [f"config={path}", "optim.lr=0.25", "data.sources.b=3", "steps=7"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.sources) == (7, 0.25, {"a": 1.0, "b": 3.0})


def test_dump_then_load_reproduces_config(tmp_path):
    cfg = load_config(Cfg, ["optim.lr=0.125", "data.sources.x=2", "data.path=/tmp/a b", "name=it's"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(Cfg, [f"config={tmp_path / 'config.yaml'}"]) == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["stepz=3"], "unknown key 'stepz' (did you mean 'steps'?)"),
        (["optim.lr=abc"], "invalid value for 'optim.lr' in command line: expected float, got str 'abc'"),
        (["steps=1.5"], "invalid value for 'steps' in command line: expected int, got float 1.5"),
        (["steps"], "expected key=value on the command line, got 'steps'"),
        (["config=/does/not/exist.yaml"], "config file '/does/not/exist.yaml' not found"),
    ],
)
def test_errors_are_one_clear_line(argv, message):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, argv)
    assert str(e.value) == message


def test_unknown_key_in_yaml_names_full_dotted_key(tmp_path):
    path = write(tmp_path, "data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.batch_sise' \(did you mean 'data.batch_size'\?\)"):
        load_config(Cfg, [f"config={path}"])


def test_wrong_type_in_yaml_names_file(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, [f"config={path}"])
    assert str(e.value) == f"invalid value for 'data.batch_size' in '{path}': expected int, got str 'lots'"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "steps: 3\noptim:\n  lr: [1, 2\nname: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, [f"config={path}"])
    assert str(e.value).startswith(f"config file '{path}' line ")
    assert "invalid YAML" in str(e.value)


def test_app_entry_point_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "apps.main.train", "optim.lrr=1", f"dump_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    assert "Traceback" not in proc.stderr
