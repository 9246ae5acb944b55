"""SLURM submission: snapshot the code and config into dump_dir, write submit.slurm, submit it.

    python -m lingua.stool script=apps.main.train config=apps/main/configs/debug.yaml nodes=1 ngpu=8 \
        [optim.lr=3e-4 steps=1000 ...] [-- key=value ...]

Command line: every argument is `key=value`. Keys that are `StoolArgs` fields configure the job; every other key
is an override of the training config (applied on top of `config=`, with omegaconf's dotlist rules, exactly as the
training CLI would apply it). Arguments after a lone `--` are always training overrides. `name` and `dump_dir` belong
to both: given here they replace the config's values; otherwise they are read from the config.

What lands in dump_dir:
    base_config.yaml   the merged training config the job runs with
    code/              a copy of the code (git-tracked + untracked-but-not-ignored files, or, outside git, every file
                       except data, checkpoints, dumps and virtualenvs); the job runs from it, so later edits of the
                       working tree cannot change a queued or requeued job. Top-level entries that were not copied
                       (data/, tokenizers/, ...) are symlinked, so relative paths in the config still resolve.
    plan.txt           GPU jobs: the run's plan (python -m lingua.plan): memory, FLOPs, collectives, time per GPU
    submit.slurm       the batch script; `sbatch <dump_dir>/submit.slurm` resubmits it by hand
    logs/<jobid>.stdout, logs/<jobid>.stderr   per-job logs (appended across requeues)

Preemption: the job is submitted with `--requeue` and `--signal=USR2@<signal_grace>`; the batch script forwards a
SIGUSR2 it receives (`scancel --batch --signal=USR2 <job>`) to the training processes. The training code is expected
to checkpoint on SIGUSR2 and call `scontrol requeue $SLURM_JOB_ID`; the rerun sees SLURM_RESTART_COUNT>=1.

Quoting: every user value reaches the shell through shlex.quote, and #SBATCH lines (parsed by sbatch, not a shell)
through sbatch's own quoting. Overrides never reach the shell at all: they go into base_config.yaml.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lingua.args import load_config, print_help_if_asked
from lingua.errors import ConfigError, LinguaError, print_error
from lingua.tools.snapshot import snapshot_code


@dataclass
class StoolArgs:
    script: str = "apps.main.train"  # python module the job runs as `python -m <script> config=...`
    config: str = ""  # training config YAML (required)
    name: str = ""  # job and run name; default: the config's name, else the basename of dump_dir
    dump_dir: str = ""  # run directory; default: the config's dump_dir
    nodes: int = 1  # nodes of the job
    ngpu: int = 8  # GPUs per node; 0 = CPU job
    ncpu: int = 0  # CPUs per task; 0 = the node's CPUs / tasks per node (sinfo; this machine for launcher=bash)
    tasks_per_node: int = 0  # 0 = one task per GPU (ngpu), or 1 for a CPU job
    mem: str = ""  # --mem per node, e.g. 64G; "" = the cluster's default
    time: int = -1  # time limit in minutes; -1 = the partition's default
    partition: str = ""  # SLURM partition; "" = the cluster's default
    qos: str = ""  # SLURM quality of service
    account: str = ""  # SLURM account to charge
    constraint: str = ""  # SLURM --constraint (node features)
    exclude: str = ""  # SLURM --exclude (nodes not to use)
    venv: str = ""  # virtualenv to activate in the job (source <venv>/bin/activate)
    anaconda: str = ""  # conda env (name or path) to activate; with neither, the job uses the python running stool
    launcher: str = "sbatch"  # sbatch | bash (run submit.slurm here, in the foreground, without SLURM)
    signal_grace: int = 120  # seconds before the time limit at which SLURM sends SIGUSR2; 0 = none
    # a failed job step (a dead or hung rank) is launched again this many times, every rank resuming from the last
    # complete checkpoint (torchrun's --max-restarts for launcher=bash); a config error (exit 2) never is
    max_restarts: int = 2
    copy_code: bool = True  # snapshot the code into <dump_dir>/code and run from there
    dirs_exists_ok: bool = False  # reuse an existing, non-empty dump_dir (config, code and script are rewritten)
    override: bool = False  # delete an existing dump_dir first (asks for confirmation unless yes=true)
    yes: bool = False  # do not ask before override deletes dump_dir
    dry_run: bool = False  # write everything into dump_dir, do not submit
    plan: bool = True  # GPU jobs: plan the run first (lingua.plan), refuse one that will not fit, write plan.txt
    gpu: str = "h100"  # the GPU kind the plan prices (lingua.plan.gpus: h100 | h200 | a100 | b200 | mi300x)


STOOL_KEYS = {f.name for f in fields(StoolArgs)}
MODULE_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")



def log(msg: str) -> None:
    print(f"[stool] {msg}", flush=True)


def parse_args(argv: list[str]) -> tuple[StoolArgs, list[str]]:
    """Split `key=value` arguments into StoolArgs and training overrides (see the module docstring)."""
    ours, overrides, forward_all = [], [], False
    for arg in argv:
        if arg == "--" and not forward_all:
            forward_all = True
            continue
        key, eq, _ = arg.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"expected key=value, got {arg!r}")
        (ours if key in STOOL_KEYS and not forward_all else overrides).append(arg)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(StoolArgs), OmegaConf.from_dotlist(ours))
        args = OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConfBaseException, or yaml.YAMLError for a value like [1
        raise ConfigError(f"bad stool argument: {_one_line(e)}") from None
    return args, overrides


def _one_line(e: Exception) -> str:
    """omegaconf's message, first line only, prefixed with the key it is about."""
    msg = str(e).split("\n")[0] or type(e).__name__
    key = getattr(e, "full_key", None)
    return f"'{key}': {msg}" if key else msg


def load_training_config(args: StoolArgs, overrides: list[str]):
    """Load config=, apply the overrides, make name/dump_dir agree between stool and the training config."""
    if not args.config:
        raise ConfigError("config is not set: pass config=path/to/config.yaml")
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"config file not found: {args.config}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, OmegaConfBaseException
        raise ConfigError(f"{args.config}: cannot parse: {_one_line(e)}") from None
    if not OmegaConf.is_dict(cfg):
        raise ConfigError(f"{args.config}: expected a mapping at the top level")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except Exception as e:  # yaml.YAMLError for a value like [1, OmegaConfBaseException
        raise ConfigError(f"bad training override: {_one_line(e)}") from None
    for key in ("dump_dir", "name"):
        if getattr(args, key) == "":
            try:
                value = cfg.get(key)
            except OmegaConfBaseException as e:
                raise ConfigError(f"{args.config}: cannot resolve '{key}': {_one_line(e)}") from None
            setattr(args, key, "" if value is None else str(value))
    if not args.dump_dir:
        raise ConfigError(f"dump_dir is not set: pass dump_dir=... or set it in {args.config}")
    args.dump_dir = os.path.abspath(os.path.expanduser(args.dump_dir))
    args.name = args.name or os.path.basename(args.dump_dir)
    # Literal strings: escape omegaconf's interpolation marker so the job reads back exactly these values.
    cfg.dump_dir = args.dump_dir.replace("${", "\\${")
    cfg.name = args.name.replace("${", "\\${")
    return cfg


def check_overrides(args: StoolArgs, overrides: list[str]):
    """Load config= plus the overrides with the script's own schema, as the job will: a typo'd key fails here in one
    line instead of in the queued job. A script without a lingua ModelSpec (not a lingua train loop) is not checked."""
    import importlib

    try:
        module = importlib.import_module(args.script)
    except ImportError as e:
        raise ConfigError(f"script '{args.script}' cannot be imported: {e}") from None
    from lingua.models.spec import ModelSpec

    specs = [v for v in vars(module).values() if isinstance(v, ModelSpec)]
    if len(specs) != 1:
        return None
    from lingua.train.loop import train_args_cls

    # name/dump_dir: any string; returns (spec, training config) for the plan
    return specs[0], load_config(train_args_cls(specs[0]), [f"config={args.config}", *overrides])


def plan_job(args: StoolArgs, checked) -> str:
    """The job's plan (lingua.plan) on nodes x tasks_per_node GPUs of kind `gpu`, as text; a job that will not fit
    (or whose step cannot be planned) is refused in one line. CPU jobs, plan=false and scripts without a ModelSpec
    skip it."""
    if not args.plan or args.ngpu == 0 or checked is None:
        return ""
    from lingua.plan import format_plan, plan

    spec, cfg = checked
    p = plan(cfg, spec, args.nodes * tasks_per_node(args), args.gpu, suggest=False)
    if not p.fits:
        raise LinguaError(f"the plan says this job does not fit: {p.peak_gib:.1f} GiB per GPU on {p.gpu.name}; "
                          f"python -m lingua.plan config={args.config} world_size={p.world_size} gpu={args.gpu} "
                          "... suggests changes; plan=false submits anyway")
    return format_plan(p, args.config)


def validate(args: StoolArgs) -> None:
    if args.launcher not in ("sbatch", "bash"):
        raise ConfigError(f"launcher must be 'sbatch' or 'bash', got {args.launcher!r}")
    if not MODULE_RE.fullmatch(args.script):
        raise ConfigError(f"script must be a python module name like apps.main.train, got {args.script!r}")
    if args.nodes < 1:
        raise ConfigError(f"nodes must be >= 1, got {args.nodes}")
    for key in ("ngpu", "ncpu", "tasks_per_node", "signal_grace", "max_restarts"):
        if getattr(args, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(args, key)}")
    if args.time == 0 or args.time < -1:
        raise ConfigError(f"time must be minutes > 0, or -1 for the partition default, got {args.time}")
    if args.launcher == "bash" and args.nodes > 1 and not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError("launcher=bash outside a SLURM allocation runs on this machine: nodes must be 1")
    if args.venv and args.anaconda:
        raise ConfigError("set venv or anaconda, not both")
    if args.venv and not os.path.isfile(os.path.join(args.venv, "bin", "activate")):
        raise ConfigError(f"venv: no bin/activate in {args.venv}")
    # Values that go into #SBATCH lines, which sbatch reads line by line.
    for key in ("dump_dir", "name", "mem", "partition", "qos", "account", "constraint", "exclude"):
        value = getattr(args, key)
        if any(c in value for c in "\n\r\0"):
            raise ConfigError(f"{key} contains a newline or NUL, which cannot go into an #SBATCH line: {value!r}")
    if "\\" in args.dump_dir:
        # SLURM turns off %j expansion in log paths that contain a backslash.
        raise ConfigError(f"dump_dir must not contain a backslash: {args.dump_dir!r}")


def tasks_per_node(args: StoolArgs) -> int:
    return args.tasks_per_node or args.ngpu or 1


def cpus_per_task(node_cpus: int, tasks: int) -> int:
    """ncpu=0: the node's CPUs shared by its tasks (8 GPUs on a 96-core node: 12 each, not a fixed 16 that asks
    128 CPUs of a 96-CPU node and never schedules)."""
    return max(1, node_cpus // tasks)


def min_node_cpus(sinfo_out: str) -> int:
    """The fewest CPUs of any node in `sinfo -h -o %c` output (lines such as '96' or '64+')."""
    counts = [int(m) for m in re.findall(r"\d+", sinfo_out)]
    if not counts:
        raise LinguaError(f"sinfo printed no CPU count ({sinfo_out.strip()[:80]!r}): set ncpu")
    return min(counts)


def node_cpus(args: StoolArgs) -> int:
    """CPUs per node: the partition's smallest node (sinfo); this machine's without SLURM (launcher=bash, or a
    dry run where sinfo is not installed)."""
    if shutil.which("sinfo") is None or (args.launcher == "bash" and not os.environ.get("SLURM_JOB_ID")):
        return os.cpu_count() or 1
    cmd = ["sinfo", "-h", "-o", "%c"] + (["-p", args.partition] if args.partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LinguaError(f"ncpu=0 reads the nodes' CPUs with sinfo, which failed ({_one_line(e)}): set ncpu") from None
    return min_node_cpus(out)


def sbatch_quote(value: str) -> str:
    """Quote for an #SBATCH line: sbatch splits on spaces, honours quotes and backslash, expands nothing."""
    if re.fullmatch(r"[\w.,:/@%+=-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_header(args: StoolArgs) -> list[str]:
    """The #SBATCH lines: resources, logs appended across requeues, the warning signal before the time limit."""
    logs = os.path.join(args.dump_dir, "logs").replace("%", "%%")  # % starts a SLURM filename pattern
    header = [("job-name", args.name), ("nodes", str(args.nodes)), ("ntasks-per-node", str(tasks_per_node(args))),
              ("cpus-per-task", str(args.ncpu))]
    if args.ngpu > 0:
        header.append(("gres", f"gpu:{args.ngpu}"))
    if args.mem:
        header.append(("mem", args.mem))
    if args.time > 0:
        header.append(("time", str(args.time)))
    header += [(key, getattr(args, key)) for key in ("partition", "qos", "account", "constraint", "exclude")
               if getattr(args, key)]
    header += [("output", f"{logs}/%j.stdout"), ("error", f"{logs}/%j.stderr"),
               ("open-mode", "append")]  # keep the log of a preempted run when the job is requeued
    if args.signal_grace > 0:
        header.append(("signal", f"USR2@{args.signal_grace}"))
    return [f"#SBATCH --{key}={sbatch_quote(value)}" for key, value in header] + ["#SBATCH --requeue"]


def _activate(args: StoolArgs) -> str:
    if args.venv:
        return f"source {shlex.quote(os.path.join(os.path.abspath(args.venv), 'bin', 'activate'))}"
    if args.anaconda:
        return f'eval "$("${{CONDA_EXE:-conda}}" shell.bash hook)"\nconda activate {shlex.quote(args.anaconda)}'
    return "# no venv/anaconda given: the python that ran stool"


def render_submit_script(args: StoolArgs, python: str, code_dir: str) -> str:
    """The batch script. `bash submit.slurm` outside a SLURM job runs the same steps without srun."""
    q = shlex.quote
    ntasks = tasks_per_node(args)
    config = '"$DUMP_DIR/base_config.yaml"'
    srun = (f"srun --kill-on-bad-exit=1 --nodes={args.nodes} --ntasks-per-node={ntasks} --cpus-per-task={args.ncpu} "
            f"\"$PYTHON\" -u -m {q(args.script)} config={config}")
    if ntasks * args.nodes == 1:
        local = f'"$PYTHON" -u -m {q(args.script)} config={config}'
    else:
        local = (f'"$PYTHON" -u -m torch.distributed.run --standalone --nproc-per-node={ntasks} '
                 f"--max-restarts={args.max_restarts} -m {q(args.script)} config={config}")
    body = f"""
set -eo pipefail
DUMP_DIR={q(args.dump_dir)}
{_activate(args)}
PYTHON={q(python)}
cd {q(code_dir)}
export PYTHONPATH={q(code_dir)}${{PYTHONPATH:+:$PYTHONPATH}}
export OMP_NUM_THREADS={args.ncpu if args.ngpu == 0 else 1}
echo "[stool] job ${{SLURM_JOB_ID:-local}} restart ${{SLURM_RESTART_COUNT:-0}} on $(hostname) at $(date -Is): $PWD"

if [ -z "${{SLURM_JOB_ID:-}}" ]; then
  # launcher=bash: no SLURM, run here (several tasks through torchrun).
  exec {local}
fi
# SIGUSR2 sent to this batch shell (scancel --batch --signal=USR2) goes on to the training processes, which
# checkpoint and requeue the job (scontrol requeue $SLURM_JOB_ID).
trap 'echo "[stool] SIGUSR2: forwarding to the job step" >&2; kill -USR2 "$step" 2>/dev/null || true' USR2
restarts=0
while :; do
  {srun} &
  step=$!
  while :; do
    wait "$step" && status=0 || status=$?
    kill -0 "$step" 2>/dev/null || break  # still running: wait was interrupted by the trap
  done
  # a dead or hung rank ended the step (--kill-on-bad-exit stopped the others): launch every rank again, they resume
  # from the last complete checkpoint; a config error (2) would only fail again
  if [ "$status" = 0 ] || [ "$status" = 2 ] || [ "$restarts" -ge {args.max_restarts} ]; then break; fi
  restarts=$((restarts + 1))
  echo "[stool] job step failed (exit $status): restart $restarts of {args.max_restarts}" >&2
done
exit "$status"
"""
    lines = ["#!/bin/bash", f"# Written by lingua.tools.stool on {datetime.now():%Y-%m-%d %H:%M:%S}."] + sbatch_header(args)
    return "\n".join(lines) + "\n" + body


def prepare_dump_dir(args: StoolArgs, code_root: str) -> None:
    dump = Path(args.dump_dir)
    if dump.exists() and not dump.is_dir():
        raise ConfigError(f"dump_dir exists and is not a directory: {dump}")
    if dump.is_dir() and any(dump.iterdir()):
        if args.override:
            _check_deletable(dump, code_root)
            if not args.yes:
                if not sys.stdin.isatty():
                    raise ConfigError(f"override=true would delete {dump}: confirm with yes=true")
                answer = input(f"[stool] delete {dump} and everything in it? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    raise LinguaError("cancelled: dump_dir left untouched")
            shutil.rmtree(dump)
            log(f"deleted {dump}")
        elif not args.dirs_exists_ok:
            raise ConfigError(f"dump_dir {dump} already exists: pass dirs_exists_ok=true to reuse it "
                              f"or override=true to delete it first")
    (dump / "logs").mkdir(parents=True, exist_ok=True)


def _check_deletable(dump: Path, code_root: str) -> None:
    real = dump.resolve()
    protected = [Path("/"), Path.home().resolve(), Path(code_root).resolve()]
    if real in protected or real in Path(code_root).resolve().parents:
        raise ConfigError(f"override=true refuses to delete {dump}: it is /, your home or contains the code")


def submit(args: StoolArgs, script_path: str) -> int:
    if args.launcher == "bash":
        log(f"running {script_path} here with bash")
        return subprocess.run(["bash", script_path]).returncode
    if shutil.which("sbatch") is None:
        raise LinguaError("sbatch not found: is SLURM installed here? (setup/slurm_local.sh start for a local "
                          "cluster; launcher=bash runs the job without SLURM)")
    proc = subprocess.run(["sbatch", "--parsable", script_path], cwd=args.dump_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise LinguaError(f"sbatch failed: {msg}")
    job_id = proc.stdout.strip().split(";")[0]
    logs = os.path.join(args.dump_dir, "logs")
    log(f"submitted job {job_id} ({args.name!r})")
    log(f"logs: {logs}/{job_id}.stdout and .stderr")
    log(f"watch: squeue -j {job_id}; tail -f {shlex.quote(logs)}/{job_id}.stdout")
    return 0


def launch_job(args: StoolArgs, overrides: list[str]) -> int:
    """Everything after argument parsing: validate, write dump_dir, submit. Returns the exit code."""
    cfg = load_training_config(args, overrides)
    validate(args)
    plan_text = plan_job(args, check_overrides(args, overrides))  # before dump_dir is touched
    if args.ncpu == 0:
        args.ncpu = cpus_per_task(node_cpus(args), tasks_per_node(args))
        log(f"ncpu=0: {args.ncpu} CPUs per task ({tasks_per_node(args)} tasks per node)")
    code_root = os.getcwd()
    prepare_dump_dir(args, code_root)
    if plan_text:
        Path(args.dump_dir, "plan.txt").write_text(plan_text + "\n")
        log(f"plan: {plan_text.splitlines()[-2].strip()} (plan.txt)")
    with open(os.path.join(args.dump_dir, "base_config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg))
    if args.copy_code:
        code_dir = os.path.join(args.dump_dir, "code")
        if os.path.isdir(code_dir):
            shutil.rmtree(code_dir)  # dirs_exists_ok: the snapshot is of the code now, not a mix
        n, linked = snapshot_code(code_root, code_dir, exclude=args.dump_dir)
        log(f"code: copied {n} files from {code_root} to {code_dir}")
        if linked:
            log(f"code: linked, not copied: {', '.join(linked)}")
    else:
        code_dir = code_root
    python = sys.executable if not (args.venv or args.anaconda) else "python"
    script_path = os.path.join(args.dump_dir, "submit.slurm")
    with open(script_path, "w") as f:
        f.write(render_submit_script(args, python, code_dir))
    log(f"wrote {script_path} (config {args.dump_dir}/base_config.yaml)")
    if args.dry_run:
        log(f"dry_run: not submitted; submit with: sbatch {shlex.quote(script_path)}")
        return 0
    return submit(args, script_path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if print_help_if_asked(StoolArgs, argv):
            print("\nEvery other key=value (or any after a lone --) overrides the training config: "
                  "`python -m <script> --help` lists those.")
            return 0
        args, overrides = parse_args(argv)
        return launch_job(args, overrides)
    except LinguaError as e:
        return print_error(e)


if __name__ == "__main__":
    sys.exit(main())
