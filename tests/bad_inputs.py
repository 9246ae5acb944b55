"""Every bad input we know of, run through the real command lines; prints the table for the README / closing note.

    python -m tests.bad_inputs [--md table.md] [--json rows.json]

Each case is a real process running `python -m <module> <args>` exactly as a user would (`runpy`, `__main__`), forked
from this one after torch is imported, so the ~15 cases cost seconds, not a torch import each. A row records the exit
code, the stderr lines, whether a traceback appeared, the line that names the key or file, and whether any file
that existed before the case is gone. tests/test_bad_inputs.py asserts on the rows.
"""

import argparse
import base64
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class Case:
    name: str
    module: str
    args: Callable[["Env"], list[str]]  # the command line, given the prepared files
    expect: str  # the text the one line (or warning) must contain
    exit: int = 1  # expected exit code (0: a warning case)
    watch: Optional[Callable[["Env"], Path]] = None  # a directory whose files must all survive the case
    check: Optional[Callable[["Env"], str]] = None  # extra check after the run; returns "" or what went wrong


@dataclass
class Row:
    case: str
    exit: int
    stderr_lines: int
    traceback: bool
    line: str
    lost: list[str] = field(default_factory=list)
    problem: str = ""


class Env:
    """The files the cases read: a tiny corpus, a trained run (checkpoints 2 and 4), copies made per case."""

    def __init__(self, work: Path):
        from tests.conftest import tiny_overrides, write_corpus

        self.work, self.corpus = work, write_corpus(work / "corpus")
        self.tiny = lambda dump, **kw: tiny_overrides(self.corpus, dump, eval__at_end=False, **kw)
        self.base = work / "base"
        code, _, err = run_process("apps.main.train", self.tiny(self.base, steps=4, checkpoint__dump__every=2))
        assert code == 0, err
        self.tiktoken = work / "other.tiktoken"  # another tokenizer with the same vocabulary size as bytes
        self.tiktoken.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
        self.mounts: list[Path] = []

    def copy(self, name: str) -> Path:
        dst = self.work / name
        shutil.copytree(self.base, dst)
        return dst

    def ckpt(self, run: Path, step: int = 4) -> Path:
        return run / "checkpoints" / f"{step:010d}"

    def read_only_dir(self) -> Path:
        d = self.work / "read_only"
        d.mkdir()
        ro = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
        if ro.returncode == 0:
            self.mounts.append(d)  # root ignores file modes: a read-only file system it cannot ignore
        else:
            d.chmod(0o555)
        return d

    def close(self):
        for d in self.mounts:
            subprocess.run(["umount", "-l", str(d)], check=False)


def run_process(module: str, argv: list[str]) -> tuple[int, str, str]:
    """`python -m module argv...` in a forked child; returns (exit code, stdout, stderr)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    pid = os.fork()
    if pid == 0:  # the child: become `python -m module`
        code = 1
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
            logging.getLogger().handlers.clear()
            # an artifact of running an already imported module as __main__, not of the command line
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")
            sys.argv = [module, *argv]
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except BaseException:
                traceback.print_exc()
                code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return os.waitstatus_to_exitcode(status), out.read(), err.read()


def _files(d: Optional[Path]) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} if d and d.is_dir() else set()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_state(env: Env) -> list[str]:
    run = env.copy("garbage_state")
    (env.ckpt(run) / "train_state_00000.json").write_bytes(b"\x00{not json")
    return env.tiny(run, steps=6)


def _flipped_shard(env: Env) -> list[str]:
    run = env.copy("flipped")
    _flip(env.ckpt(run) / "__0_0.distcp")
    return env.tiny(run, steps=6)


def _truncated(env: Env, name: str, old: bool) -> list[str]:
    run = env.copy(name)
    _truncate(env.ckpt(run) / "__0_0.distcp")
    if old:  # a checkpoint from before checksums: DCP's own reader meets the truncation
        (env.ckpt(run) / "COMPLETE").write_text("4\n")
    return ["consolidate", str(env.ckpt(run)), str(env.work / f"{name}_out")]


def _binary_config(env: Env) -> list[str]:
    cfg = env.work / "binary.yaml"
    cfg.write_bytes(bytes(range(128, 256)) * 4)
    return [f"config={cfg}"] + env.tiny(env.work / "binary_run")


def _in_use(env: Env) -> list[str]:
    from lingua.checkpoint.lock import RunLock

    run = env.copy("in_use")
    env.lock = RunLock(run).__enter__()  # held by this process; the forked case opens the file anew, and is refused
    return env.tiny(run, steps=6)


def _resume_rows(env: Env) -> list[str]:
    run = env.copy("resume_rows")
    shutil.rmtree(env.ckpt(run, 4))  # killed after step 4 was logged but before its checkpoint: steps 3-4 replay
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and the last line was cut mid-write
    return env.tiny(run, steps=4)


def _steps_once(env: Env) -> str:
    steps = [json.loads(line)["step"] for line in (env.work / "resume_rows" / "metrics.jsonl").read_text().splitlines()]
    return f"ok: metrics.jsonl steps after the resume: {steps}" if steps == [1, 2, 3, 4] else f"steps {steps}"


def _old_state_without_key(env: Env) -> list[str]:
    run = env.copy("state_no_key")
    (env.ckpt(run) / "COMPLETE").write_text("4\n")  # from before checksums
    state = env.ckpt(run) / "train_state_00000.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "data"}))
    return env.tiny(run, steps=6)


def _stool(env: Env) -> list[str]:
    return [f"config={env.base / 'config.yaml'}", f"dump_dir={env.work / 'stool_run'}", "dry_run=true", "ngpu=0",
            "optim.lrr=1"]


def _nothing_written(env: Env) -> str:
    return "" if not (env.work / "stool_run").exists() else "stool wrote dump_dir before refusing"


def _ckpt_args(env: Env, *extra: str) -> list[str]:
    return [f"ckpt_dir={env.ckpt(env.base)}", "tokenizer.name=tiktoken", f"tokenizer.path={env.tiktoken}", *extra]


def _plan(*extra: str) -> Callable[["Env"], list[str]]:
    return lambda env: [f"config={ROOT / 'apps/main/configs/debug.yaml'}", *extra]


CASES = [
    Case("optim.lr=-1", "apps.main.train", lambda e: e.tiny(e.work / "r1", optim__lr=-1), "optim.lr", exit=2),
    Case("data.seq_len=-5", "apps.main.train", lambda e: e.tiny(e.work / "r2", data__seq_len=-5), "data.seq_len",
         exit=2),
    Case("logging.freq=0", "apps.main.train", lambda e: e.tiny(e.work / "r3", logging__freq=0), "logging.freq",
         exit=2),
    Case("typo'd key optim.lrr=1", "apps.main.train", lambda e: e.tiny(e.work / "r4") + ["optim.lrr=1"],
         "optim.lrr", exit=2),
    Case("binary config= file", "apps.main.train", _binary_config, "binary.yaml", exit=2),
    Case("read-only dump_dir", "apps.main.train", lambda e: e.tiny(e.read_only_dir()), "read_only"),
    Case("dump_dir in use by another run", "apps.main.train", _in_use, f"pid {os.getpid()}",
         watch=lambda e: e.work / "in_use"),
    Case("optim.lr=0 (warns)", "apps.main.train", lambda e: e.tiny(e.work / "r5", steps=1, optim__lr=0),
         "optim.lr=0", exit=0),
    Case("optim.warmup > steps (warns)", "apps.main.train",
         lambda e: e.tiny(e.work / "r6", steps=1, optim__warmup=5), "optim.warmup=5", exit=0),
    Case("garbage train_state_*.json", "apps.main.train", _garbage_state, "train_state_00000.json",
         watch=lambda e: e.work / "garbage_state"),
    Case("train_state_*.json without a key (old checkpoint, no checksums)", "apps.main.train", _old_state_without_key,
         "train_state_00000.json' has no 'data'", watch=lambda e: e.work / "state_no_key"),
    Case("flipped bytes in a .distcp (resume)", "apps.main.train", _flipped_shard, "__0_0.distcp",
         watch=lambda e: e.work / "flipped"),
    Case("consolidate a truncated checkpoint", "lingua.checkpoint.manager", lambda e: _truncated(e, "trunc", False),
         "__0_0.distcp", watch=lambda e: e.work / "trunc"),
    Case("consolidate a truncated old checkpoint (no checksums)", "lingua.checkpoint.manager",
         lambda e: _truncated(e, "trunc_old", True), "0000000004", watch=lambda e: e.work / "trunc_old"),
    Case("eval with another tokenizer", "apps.main.eval", lambda e: _ckpt_args(e, f"dump_dir={e.work / 'ev'}"),
         "params.json"),
    Case("generate with another tokenizer", "apps.main.generate", lambda e: _ckpt_args(e, "prompt=the"),
         "params.json"),
    Case("stool with a typo'd override", "lingua.tools.stool", _stool, "optim.lrr", exit=2, check=_nothing_written),
    Case("plan on an unknown GPU", "lingua.plan", _plan("world_size=8", "gpu=tpu"), "gpu='tpu'", exit=2),
    Case("plan on a world size the mesh does not factor", "lingua.plan",
         _plan("world_size=6", "distributed.tp_size=4"), "world size 6", exit=2),
    Case("plan of a config that does not build", "lingua.plan", _plan("world_size=2", "model.n_heads=3"),
         "model.n_heads=3", exit=2),
    Case("resume after a kill: metrics.jsonl rows replayed", "apps.main.train", _resume_rows, "", exit=0,
         check=_steps_once),
]


def run_case(case: Case, env: Env) -> Row:
    argv = case.args(env)
    watched = case.watch(env) if case.watch else None
    before = _files(watched)
    code, out, err = run_process(case.module, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    pool = lines if case.exit else [line for line in (out + err).splitlines() if "WARNING" in line]
    line = next((x for x in pool if case.expect and case.expect in x), pool[0] if pool else "")
    row = Row(case.name, code, len(lines), "Traceback" in err, line.strip(), sorted(before - _files(watched)))
    problems = [f"exit {code} != {case.exit}"] if code != case.exit else []
    problems += ["traceback"] * row.traceback + [f"{len(lines)} stderr lines"] * (len(lines) > 4)
    problems += [f"no line with {case.expect!r}"] * bool(case.expect and case.expect not in line)
    note = case.check(env) if case.check else ""
    if note.startswith("ok: "):
        row.line, note = row.line or note[4:], ""
    problems += [f"lost {row.lost}"] * bool(row.lost) + [note]
    row.problem = "; ".join(p for p in problems if p)
    if row.problem:
        row.line += f" || stderr tail: {err[-400:]!r}"
    return row


def markdown(rows: list[Row]) -> str:
    out = ["| case | exit | stderr lines | the line |", "| --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r.case} | {r.exit} | {r.stderr_lines} | `{r.line.replace('|', '/')}` |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--md")
    p.add_argument("--json")
    opts = p.parse_args(argv)
    import lingua.eval.load  # noqa: F401  (imported once here, so that every forked case starts warm)
    import lingua.train.loop  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        env = Env(Path(tmp))
        try:
            rows = [run_case(c, env) for c in CASES]
        finally:
            env.close()
    table = markdown(rows)
    print(table)
    if opts.md:
        Path(opts.md).write_text(table)
    if opts.json:
        Path(opts.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.problem for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
