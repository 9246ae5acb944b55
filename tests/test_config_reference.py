"""The config reference (lingua/config_doc.py): README's table is what the dataclasses say, every key has a
description, and `--help [SECTION]` answers on every entry point instead of failing as a bad key=value."""

import subprocess
import sys

import pytest

from apps.main import config_reference
from apps.main.eval import EvalAppArgs
from apps.main.export_hf import ExportArgs
from apps.main.generate import GenerateAppArgs
from apps.main.generate import cli as generate_cli
from lingua.args import run_cli
from lingua.config_doc import help_text, key_docs
from lingua.errors import ConfigError
from lingua.models.spec import builtin_specs, get_spec
from lingua.tools import stool
from lingua.train.loop import TrainArgs, train_args_cls
from lingua.train.loop import main as train_main

SCHEMAS = [train_args_cls(get_spec(p)) for p in builtin_specs()] + [EvalAppArgs, GenerateAppArgs, ExportArgs,
                                                                     stool.StoolArgs]


def test_readme_reference_is_the_generated_one():
    text = config_reference.README.read_text()
    assert config_reference.readme_with_reference(text) == text, (
        "README.md's config reference is stale: run `python -m apps.main.config_reference --write`")


@pytest.mark.parametrize("cls", SCHEMAS, ids=lambda c: c.__name__)
def test_every_key_has_a_description(cls):
    assert [r.key for r in key_docs(cls) if not r.doc] == []


def test_rows_read_type_default_and_comment_from_the_dataclass():
    rows = {r.key: r for r in key_docs(TrainArgs)}
    assert (rows["distributed.ac"].type, rows["distributed.ac"].default) == ("str", "none")
    assert rows["distributed.ac"].doc.startswith("activation checkpointing of every block: none | full")  # above
    assert (rows["model.n_heads"].type, rows["model.n_heads"].default) == ("int | null", "null")
    assert rows["data.sources"].type == "dict[str, float]" and rows["data.sources"].default == "{}"
    assert rows["optim.lr"].doc.startswith("under muon the same lr")  # a trailing comment
    assert rows["model.dim"].doc.startswith("model width")  # declared by DecoderArgs, read through the subclass


@pytest.mark.slow  # a process start: ~20 s on 2 busy cores; test_help_section_... runs the same code in-process
def test_train_help_runs_as_a_command_and_lists_every_key():
    out = subprocess.run([sys.executable, "-m", "apps.main.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    for row in key_docs(TrainArgs):
        assert row.type in lines[row.key] and f" {row.default} " in lines[row.key], row.key
    assert "[model]" in out.stdout and "[distributed]" in out.stdout


@pytest.mark.parametrize("path", builtin_specs())
def test_help_section_shows_that_section_of_the_app(path, capsys):
    spec = get_spec(path)
    assert train_main(spec, ["--help", "model"]) is None
    out = capsys.readouterr().out
    assert "[model]" in out and "[optim]" not in out and "optim.lr " not in out
    for f in spec.args_cls.__dict__["__annotations__"]:  # the app's own model keys are listed
        assert f"  model.{f} " in out


@pytest.mark.parametrize("call, cls", [
    (lambda argv: run_cli(lambda a: pytest.fail("ran"), EvalAppArgs, argv), EvalAppArgs),
    (generate_cli, GenerateAppArgs),
    (lambda argv: run_cli(lambda a: pytest.fail("ran"), ExportArgs, argv), ExportArgs),
    (stool.main, stool.StoolArgs),
], ids=["eval", "generate", "export_hf", "stool"])
def test_help_on_the_other_entry_points(call, cls, capsys):
    call(["ckpt_dir=x", "--help"])
    out = capsys.readouterr().out
    assert out.startswith(help_text(cls) + "\n")


def test_help_of_an_unknown_section_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(get_spec(builtin_specs()[0]), ["--help", "modle"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: --help modle: no such section (sections: general, optim, model, data, distributed, "
                           "checkpoint, logging, profiling, probe, eval)")
    with pytest.raises(ConfigError, match="no such section"):
        help_text(TrainArgs, "modle")
