"""Config precedence, round trips and one-line errors (lingua/args.py)."""

import logging
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


# ---------------------------------------------------------------- the real schema: folded keys, derived sizes


def test_folded_keys_of_old_configs_are_read_as_their_replacement(tmp_path, caplog):
    """A config dumped before the folds holds the old switches beside the new key's default: the old switch
    decides, as it did (zero init won over init_std_factor, selective AC over full AC); one warning per key."""
    from lingua.train.loop import TrainArgs

    path = write(tmp_path, "model:\n  zero_init_proj: true\n  init_std_factor: disabled\ndistributed:\n"
                           "  activation_checkpointing: true\n  selective_activation_checkpointing: true\n")
    with caplog.at_level(logging.WARNING, logger="lingua"):
        cfg = load_config(TrainArgs, [f"config={path}"])
    assert (cfg.model.init_std_factor, cfg.distributed.ac) == ("zero", "selective")
    warned = [r.getMessage() for r in caplog.records if "deprecated key" in r.getMessage()]
    assert len(warned) == 3 and "read as distributed.ac=selective" in warned[-1]
    assert load_config(TrainArgs, ["distributed.activation_checkpointing=true"]).distributed.ac == "full"
    off = load_config(TrainArgs, ["distributed.selective_activation_checkpointing=false", "model.zero_init_proj=false"])
    assert (off.distributed.ac, off.model.init_std_factor) == ("none", "disabled")
    with pytest.raises(ConfigError) as e:
        load_config(TrainArgs, ["distributed.activation_checkpointing=maybe"])
    assert str(e.value) == ("invalid value for deprecated key 'distributed.activation_checkpointing' in command line: "
                            "expected true or false, got str 'maybe'")
    with pytest.raises(ConfigError, match=r"^distributed.ac='some' is not one of none, full, selective$"):
        load_config(TrainArgs, ["distributed.ac=some"])


def test_derived_sizes_are_not_written_back_and_round_trip(tmp_path):
    """heads / ffn_dim are derived, never fields: config.yaml and params.json keep n_heads: null, so the same file
    with another dim derives them again (instead of carrying 2 heads of 64 into a 256-wide model), and params.json
    gives back the same args and sizes."""
    from lingua.args import config_to_dict
    from lingua.models.spec import model_args_from_params, spec_for_params
    from lingua.train.loop import TrainArgs

    cfg = load_config(TrainArgs, ["model.dim=128", "model.multiple_of=32"])
    assert (cfg.model.heads, cfg.model.ffn_dim) == ((2, 2, 64), 352)
    dump_config(cfg, tmp_path / "config.yaml")
    assert "n_heads: null" in (tmp_path / "config.yaml").read_text() and "ffn_dim" not in config_to_dict(cfg)["model"]
    again = load_config(TrainArgs, [f"config={tmp_path / 'config.yaml'}"])
    assert again == cfg and again.model.heads == cfg.model.heads
    wider = load_config(TrainArgs, [f"config={tmp_path / 'config.yaml'}", "model.dim=256"])
    assert (wider.model.heads, wider.model.ffn_dim) == ((4, 4, 64), 704)
    params = {**config_to_dict(cfg), "model": {**config_to_dict(cfg)["model"], "vocab_size": 258}}
    back = model_args_from_params(params, spec_for_params(params, "params.json"), "params.json")
    assert back.heads == (2, 2, 64) and back.ffn_dim == 352 and back.n_heads is None


def test_params_json_of_before_the_folds_loads():
    """params.json written before model.zero_init_proj folded into init_std_factor (both keys, + model.seed)."""
    from lingua.models.spec import model_args_from_params, spec_for_params
    from lingua.models.transformer.spec import TRANSFORMER_SPEC

    params = {"model": {"dim": 64, "n_layers": 1, "vocab_size": 10, "seed": 3, "init_std_factor": "disabled",
                        "zero_init_proj": True}}
    spec = spec_for_params(params, "params.json")
    assert spec is TRANSFORMER_SPEC
    assert model_args_from_params(params, spec, "params.json").init_std_factor == "zero"


def test_validation_reads_the_config_and_the_vocab_size_is_resolved_beside_it(tmp_path):
    import copy
    import types

    from lingua.models.transformer.spec import TRANSFORMER_SPEC
    from lingua.train.checks import validate_args
    from lingua.train.loop import TrainArgs, with_vocab_size

    args = load_config(TrainArgs, [f"dump_dir={tmp_path}", "model.dim=64"])
    tokenizer = types.SimpleNamespace(n_words=258)
    resolved = with_vocab_size(args, tokenizer)
    assert (args.model.vocab_size, resolved.model.vocab_size) == (-1, 258)
    assert resolved.model.heads == args.model.heads and resolved.optim is args.optim
    before = copy.deepcopy(resolved)
    validate_args(resolved, TRANSFORMER_SPEC, tokenizer)
    assert resolved == before
    assert with_vocab_size(resolved, types.SimpleNamespace(n_words=4)) is resolved  # a set vocab_size is kept
