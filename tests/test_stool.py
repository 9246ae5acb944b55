"""lingua.tools.stool without a cluster: argument split, dump_dir handling, code snapshot, the content and quoting of
submit.slurm (checked with a port of sbatch's #SBATCH parser and by running the script with bash)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lingua.errors import ConfigError, LinguaError
from lingua.tools import stool
from lingua.tools.snapshot import snapshot_code
from lingua.tools.stool import StoolArgs, parse_args, sbatch_quote
from tests.slurm_helpers import ROOT

FAKE = "tests.slurm_fake_train"
CPU = ["ngpu=0", "ncpu=1"]


def nasty(canary: Path) -> str:
    """Spaces, both quotes, $, ;, backticks, $(...), % and #: each would break or inject if left unquoted."""
    return f"a b 'q' \"dq\" $HOME ;touch {canary}; `touch {canary}` $(touch {canary}) 50%#c"


def sbatch_header(script: str) -> dict:
    """The options sbatch reads from the #SBATCH lines: a port of _get_argument in SLURM 22.05 src/sbatch/opt.c.
    Lines are split on whitespace; '…' and "…" group; backslash escapes the next character (inside quotes too);
    an unquoted # ends the line; nothing is expanded. Parsing stops at the first command line."""
    args = []
    for line in script.split("\n")[1:]:
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.strip().startswith("#"):
                break
            continue
        rest, i = line[len("#SBATCH"):], 0
        while True:
            while i < len(rest) and rest[i].isspace():
                i += 1
            if i >= len(rest):
                break
            arg, quote, escape = [], "", False
            while i < len(rest) and (quote or not rest[i].isspace()):
                c = rest[i]
                i += 1
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                    continue
                elif quote:
                    if c == quote:
                        quote = ""
                        continue
                elif c in "\"'":
                    quote = c
                    continue
                elif c == "#":
                    i = len(rest)
                    break
                arg.append(c)
            assert not quote, f"sbatch would fail: unmatched quote in {line!r}"
            if arg:
                args.append("".join(arg))
    header = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        assert key.startswith("--") and key not in header, arg
        header[key[2:]] = value if eq else True
    return header


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A small project (not a git repo) holding the fake training module and its config; the cwd of each test."""
    root = tmp_path / "project"
    (root / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "slurm_fake_train.py", root / "tests" / "slurm_fake_train.py")
    (root / "config.yaml").write_text(f"name: from_config\ndump_dir: {tmp_path / 'from_config'}\nsteps: 3\n"
                                      "optim:\n  lr: 0.1\n")  # valid for apps.main.train too
    monkeypatch.chdir(root)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # launcher=bash must not take the srun branch
    return root


def run(*argv: str) -> int:
    """stool's main; the plan of GPU jobs is off unless asked for (tests/test_plan.py tests it; it costs seconds)."""
    plan = [] if any(a.startswith("plan=") for a in argv) else ["plan=false"]
    return stool.main(plan + list(argv))  # first: after a lone `--` it would be a training override


# --- the command line -----------------------------------------------------------------------------------------------

def test_stool_keys_configure_the_job_everything_else_overrides_training():
    args, overrides = parse_args(["script=a.b", "config=c.yaml", "nodes=2", "ngpu=0", "dry_run=true", "optim.lr=0.1",
                                  "steps=5", "--", "nodes=7", "x=a=b"])
    assert (args.script, args.config, args.nodes, args.ngpu, args.dry_run) == ("a.b", "c.yaml", 2, 0, True)
    assert overrides == ["optim.lr=0.1", "steps=5", "nodes=7", "x=a=b"]
    assert parse_args([])[0] == StoolArgs()


@pytest.mark.parametrize("argv, words", [
    (["nodes=abc"], "nodes"), (["dry_run=maybe"], "dry_run"), (["justaword"], "justaword"), (["=x"], "=x"),
    (["partition=[1"], "flow sequence")])
def test_bad_stool_arguments_are_config_errors(argv, words):
    with pytest.raises(ConfigError, match=words):
        parse_args(argv)


def test_config_errors_are_one_line_exit_2(project, capsys):
    assert run("nodes=abc") == 2
    assert run(f"script={FAKE}") == 2 and "config is not set" in capsys.readouterr().err
    assert run("config=missing.yaml") == 2 and "config file not found: missing.yaml" in capsys.readouterr().err
    assert run("config=config.yaml", "script=apps.main.train;rm", "dry_run=true") == 2
    assert run("config=config.yaml", "launcher=srun") == 2
    assert run("config=config.yaml", "venv=/nonexistent") == 2
    assert run("config=config.yaml", "dry_run=true", "x=[1") == 2
    assert "training override" in capsys.readouterr().err
    (project / "bad.yaml").write_text("a: [1\n")
    assert run("config=bad.yaml") == 2 and "bad.yaml" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "lingua.tools.stool", "config=config.yaml", "nodes=abc"], cwd=project,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


# --- submit.slurm ---------------------------------------------------------------------------------------------------

def test_dry_run_writes_config_code_and_script(project, tmp_path, capsys):
    dump = tmp_path / "run"
    assert run(f"script={FAKE}", "config=config.yaml", f"dump_dir={dump}", *CPU, "tasks_per_node=2", "mem=1G",
               "time=30", "partition=p", "qos=q", "account=acc", "constraint=c", "exclude=n1", "signal_grace=60",
               "dry_run=true", "steps=7", "optim.lr=0.5", "model.dim=8") == 0
    assert "submitted job" not in capsys.readouterr().out
    script = (dump / "submit.slurm").read_text()
    assert sbatch_header(script) == {
        "job-name": "from_config", "nodes": "1", "ntasks-per-node": "2", "cpus-per-task": "1", "mem": "1G", "time": "30",
        "partition": "p", "qos": "q", "account": "acc", "constraint": "c", "exclude": "n1",
        "output": f"{dump}/logs/%j.stdout", "error": f"{dump}/logs/%j.stderr", "open-mode": "append",
        "signal": "USR2@60", "requeue": True}
    assert f"cd {dump}/code\n" in script and f"export PYTHONPATH={dump}/code" in script
    assert (f"srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \"$PYTHON\" -u -m {FAKE} "
            'config="$DUMP_DIR/base_config.yaml" &') in script
    assert f"PYTHON={sys.executable}\n" in script
    subprocess.run(["bash", "-n", str(dump / "submit.slurm")], check=True)
    cfg = OmegaConf.load(dump / "base_config.yaml")
    assert OmegaConf.to_container(cfg) == {"name": "from_config", "dump_dir": str(dump), "steps": 7,
                                           "optim": {"lr": 0.5}, "model": {"dim": 8}}
    assert (dump / "code" / "tests" / "slurm_fake_train.py").read_text() == (
        project / "tests" / "slurm_fake_train.py").read_text()
    assert (dump / "logs").is_dir()


def test_gpu_defaults_and_name_dump_dir_from_the_config(project, tmp_path):
    # apps.main.train's own schema checks config= and the overrides before anything is written
    (project / "typo.yaml").write_text((project / "config.yaml").read_text() + "step_time: 0\n")
    assert run("config=typo.yaml", "dry_run=true", "partition=gpu") == 2
    assert run("config=config.yaml", "dry_run=true", "partition=gpu", "optim.lrr=1") == 2
    assert not (tmp_path / "from_config").exists()
    assert run("config=config.yaml", "dry_run=true", "partition=gpu", "ncpu=16") == 0
    dump = tmp_path / "from_config"
    header = sbatch_header((dump / "submit.slurm").read_text())
    assert header["job-name"] == "from_config" and header["gres"] == "gpu:8"
    assert header["ntasks-per-node"] == "8" and header["cpus-per-task"] == "16" and header["signal"] == "USR2@120"
    assert "mem" not in header and "time" not in header and "qos" not in header
    script = (dump / "submit.slurm").read_text()
    assert "-m apps.main.train " in script and "export OMP_NUM_THREADS=1\n" in script


def test_name_defaults_to_the_dump_dir_basename_and_follows_a_forwarded_override(project, tmp_path):
    (project / "c.yaml").write_text("steps: 1\n")
    assert run("config=c.yaml", f"dump_dir={tmp_path / 'base name'}", "dry_run=true") == 0
    assert OmegaConf.load(tmp_path / "base name" / "base_config.yaml").name == "base name"
    assert run("config=c.yaml", f"dump_dir={tmp_path / 'r2'}", "dry_run=true", "--", "name=forwarded") == 0
    assert sbatch_header((tmp_path / "r2" / "submit.slurm").read_text())["job-name"] == "forwarded"
    assert run("config=c.yaml", "dry_run=true") == 2  # no dump_dir anywhere


def test_venv_and_conda_activation(project, tmp_path):
    venv = tmp_path / "my env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    assert run("config=config.yaml", f"dump_dir={tmp_path / 'v'}", f"venv={venv}", "dry_run=true") == 0
    script = (tmp_path / "v" / "submit.slurm").read_text()
    assert f"source '{venv}/bin/activate'\nPYTHON=python\n" in script
    assert run("config=config.yaml", f"dump_dir={tmp_path / 'c'}", "anaconda=my env", "dry_run=true") == 0
    assert "conda activate 'my env'\n" in (tmp_path / "c" / "submit.slurm").read_text()
    assert run("config=config.yaml", f"venv={venv}", "anaconda=x", "dry_run=true") == 2


def test_nasty_values_reach_sbatch_and_the_shell_intact(project, tmp_path):
    canary = tmp_path / "CANARY"
    bad = nasty(canary)
    dump = tmp_path / f"run {bad}"
    values = {k: f"{k} {bad}" for k in ("name", "partition", "qos", "account", "constraint", "exclude", "mem")}
    assert run(f"script={FAKE}", "config=config.yaml", f"dump_dir={dump}", *CPU, "dry_run=true",
               *[f"{k}={v}" for k, v in values.items()], "--", f"note={bad}", "multi=line1\nline2") == 0
    script = (dump / "submit.slurm").read_text()
    header = sbatch_header(script)
    for key, value in values.items():
        assert header["job-name" if key == "name" else key] == value
    assert header["output"] == f"{dump}/logs/%j.stdout".replace("%", "%%").replace("%%j", "%j")
    # Overrides go into base_config.yaml only, with the training CLI's parsing, never into the script.
    cfg = OmegaConf.load(dump / "base_config.yaml")
    assert cfg.note == OmegaConf.from_dotlist([f"note={bad}"]).note and cfg.multi == "line1 line2"
    assert "note" not in script and "line1" not in script
    assert cfg.name == values["name"] and cfg.dump_dir == str(dump)
    subprocess.run(["bash", "-n", str(dump / "submit.slurm")], check=True)
    assert not canary.exists()


def test_launcher_bash_runs_the_script_here_with_nasty_name_and_path(project, tmp_path):
    canary = tmp_path / "CANARY"
    bad = nasty(canary)
    dump = tmp_path / f"run {bad}"
    assert run(f"script={FAKE}", "config=config.yaml", f"dump_dir={dump}", f"name={bad}", *CPU,
               "launcher=bash") == 0
    seen = json.loads((dump / "ranks" / "restart0_rank0.json").read_text())
    assert seen["name"] == bad and seen["dump_dir"] == str(dump) and seen["cwd"] == str(dump / "code")
    assert json.loads((dump / "done.json").read_text())["final_step"] == 2
    assert not canary.exists()


def test_a_literal_interpolation_marker_in_the_name_stays_literal(project, tmp_path):
    (project / "c.yaml").write_text(f"name: '\\${{oops}} x'\ndump_dir: {tmp_path / 'r'}\n")
    assert run("config=c.yaml", "dry_run=true") == 0
    assert OmegaConf.load(tmp_path / "r" / "base_config.yaml").name == "${oops} x"
    assert sbatch_header((tmp_path / "r" / "submit.slurm").read_text())["job-name"] == "${oops} x"


@pytest.mark.parametrize("key, text", [("name", 'name: "a\\nb"'), ("dump_dir", 'dump_dir: "/tmp/a\\nb"'),
                                       ("dump_dir", 'dump_dir: "/tmp/a\\\\b"')])
def test_values_that_cannot_go_into_an_sbatch_line_are_refused(project, tmp_path, key, text, capsys):
    (project / "c.yaml").write_text(f"{text}\n")
    argv = ["config=c.yaml", "dry_run=true"] + ([f"dump_dir={tmp_path / 'r'}"] if key == "name" else [])
    assert run(*argv) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sbatch_quote_leaves_simple_values_bare():
    assert sbatch_quote("gpu:8") == "gpu:8" and sbatch_quote("/a/b-c_d.e") == "/a/b-c_d.e"
    for value in ['a"b', "a'b", "a\\b", "a b", "#x", "$x"]:
        assert sbatch_header(f"#!/bin/bash\n#SBATCH --x={sbatch_quote(value)}\n") == {"x": value}


# --- dump_dir -------------------------------------------------------------------------------------------------------

def test_existing_dump_dir_is_refused_reused_or_overridden(project, tmp_path, capsys, monkeypatch):
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "old.txt").write_text("old")
    base = ["config=config.yaml", f"dump_dir={dump}", "dry_run=true"]
    assert run(*base) == 2 and "already exists" in capsys.readouterr().err
    assert not (dump / "submit.slurm").exists()
    assert run(*base, "dirs_exists_ok=true") == 0
    assert (dump / "old.txt").exists() and (dump / "submit.slurm").exists()
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert run(*base, "override=true") == 2 and "yes=true" in capsys.readouterr().err
    assert (dump / "old.txt").exists()
    assert run(*base, "override=true", "yes=true") == 0
    assert not (dump / "old.txt").exists() and (dump / "submit.slurm").exists()
    # override never deletes the code it is about to snapshot
    assert run("config=config.yaml", f"dump_dir={project}", "override=true", "yes=true", "dry_run=true") == 2
    assert run("config=config.yaml", f"dump_dir={project.parent}", "override=true", "yes=true",
               "dry_run=true") == 2
    assert (project / "config.yaml").exists()


def test_override_asks_before_deleting(project, tmp_path, monkeypatch):
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "old.txt").write_text("old")
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert run("config=config.yaml", f"dump_dir={dump}", "override=true", "dry_run=true") == 1
    assert (dump / "old.txt").exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert run("config=config.yaml", f"dump_dir={dump}", "override=true", "dry_run=true") == 0
    assert not (dump / "old.txt").exists()


def test_launcher_bash_outside_slurm_is_single_node(project, tmp_path):
    assert run(f"script={FAKE}", "config=config.yaml", f"dump_dir={tmp_path / 'r'}", *CPU, "nodes=2",
               "launcher=bash") == 2
    assert not (tmp_path / "r").exists()


def test_missing_sbatch_is_a_clear_error(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert run(f"script={FAKE}", "config=config.yaml", f"dump_dir={tmp_path / 'r'}", *CPU) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sbatch not found") and err.count("\n") == 1


# --- code snapshot --------------------------------------------------------------------------------------------------

def _tree(root: Path) -> set[str]:
    """The files copied under root (links to what was not copied are left out)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def test_snapshot_of_a_git_project_takes_tracked_and_unignored_files(tmp_path):
    src = tmp_path / "repo"
    for rel in ["a.py", "pkg/b.py", "untracked.py", "data/big.bin", ".venv/lib.py", "dumps/run/x.txt",
                "ignored.log"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    (src / ".gitignore").write_text("/data/\n.venv/\n*.log\n")
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "a.py", "pkg/b.py", ".gitignore"], cwd=src, check=True)
    (src / "a.py").write_text("edited, not committed")
    n, linked = snapshot_code(str(src), str(tmp_path / "code"), exclude=str(src / "dumps" / "run"))
    assert _tree(tmp_path / "code") == {"a.py", "pkg/b.py", "untracked.py", ".gitignore"} and n == 4
    assert (tmp_path / "code" / "a.py").read_text() == "edited, not committed"  # the working tree, not HEAD
    # What was not copied is linked, so `data/big.bin` in a config resolves from the snapshot; never .git, and never
    # dumps/, which holds the dump_dir (code/ would contain itself).
    assert linked == [".venv", "data", "ignored.log"]
    assert (tmp_path / "code" / "data").resolve() == src / "data"


def test_snapshot_outside_git_skips_data_checkpoints_venvs_and_dump_dir(tmp_path):
    src = tmp_path / "plain"
    for rel in ["a.py", "configs/x.yaml", "data/big.bin", "checkpoints/c.pt", ".venv/lib.py", "venv/lib.py",
                "__pycache__/a.pyc", "x.egg-info/PKG-INFO", "runs/mine/code/a.py", "dumps/d.txt"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    _, linked = snapshot_code(str(src), str(tmp_path / "code"), exclude=str(src / "out"))
    assert _tree(tmp_path / "code") == {"a.py", "configs/x.yaml"}
    assert linked == [".venv", "__pycache__", "checkpoints", "data", "dumps", "runs", "venv", "x.egg-info"]
    # a dump_dir inside the project is never copied into itself
    (src / "out" / "code").mkdir(parents=True)
    (src / "out" / "code" / "old.py").write_text("")
    _, linked = snapshot_code(str(src), str(tmp_path / "code2"), exclude=str(src / "out"))
    assert "out" not in linked and not (tmp_path / "code2" / "out").exists()


def test_the_job_runs_the_snapshot_not_the_working_tree(project, tmp_path):
    dump = tmp_path / "run"
    (project / "data").mkdir()
    (project / "data" / "corpus.txt").write_text("tokens")
    assert run(f"script={FAKE}", "config=config.yaml", f"dump_dir={dump}", *CPU, "dry_run=true",
               "read_file=data/corpus.txt") == 0
    source = project / "tests" / "slurm_fake_train.py"
    source.write_text(source.read_text().replace('CODE_VERSION = "original"', 'CODE_VERSION = "edited"'))
    subprocess.run(["bash", str(dump / "submit.slurm")], check=True, capture_output=True)
    seen = json.loads((dump / "ranks" / "restart0_rank0.json").read_text())
    assert seen["code_version"] == "original" and seen["cwd"] == str(dump / "code")
    assert seen["read_file"] == "tokens"  # data/ is not copied but linked: relative paths resolve as in the project


def test_cpus_per_task_come_from_the_node():
    from lingua.tools.stool import cpus_per_task, min_node_cpus

    assert cpus_per_task(96, 8) == 12 and cpus_per_task(4, 8) == 1
    assert min_node_cpus("128\n96+\n") == 96
    with pytest.raises(LinguaError, match="set ncpu"):
        min_node_cpus("")


@pytest.mark.parametrize("codes, calls, status", [([1, 137, 0], 3, 0), ([1, 1, 1, 1], 3, 1), ([2], 1, 2)],
                         ids=["recovers", "gives_up", "config_error"])
def test_a_failed_job_step_is_launched_again_up_to_max_restarts(project, tmp_path, codes, calls, status):
    """The batch script's loop with srun replaced by a script that exits with `codes`, one per launch."""
    dump = tmp_path / "run"
    assert run(f"script={FAKE}", "config=config.yaml", f"dump_dir={dump}", *CPU, "tasks_per_node=2",
               "max_restarts=2", "dry_run=true") == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launches = tmp_path / "launches"
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho x >> {launches}\ncodes=({" ".join(map(str, codes))})\n'
                                  f'exit ${{codes[$(( $(wc -l < {launches}) - 1 ))]}}\n')
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(dump / "submit.slurm")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == status, out.stderr
    assert len(launches.read_text().split()) == calls
    assert out.stderr.count("[stool] job step failed") == calls - 1
