"""Who am I, on what device, in which mesh (the parallelization itself is in lingua/distributed/parallelize.py).

Launchers: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), SLURM srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master
from the job's first host), or one plain process with no process group at all. Device and backend are picked at run
time: CUDA -> nccl, CPU -> gloo. Nothing here touches CUDA unless a GPU is present.

The mesh has five dims, outer to inner: pp x dp_replicate x dp_shard x cp x tp (a dim of size 1 costs nothing).
lingua/distributed/parallelize.py applies the parallelisms to a model over this mesh, lingua/distributed/pipeline.py
splits it into pipeline stages; lingua/models/init.py makes a sharded init equal the unsharded one.
"""

import contextlib
import datetime
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from lingua.errors import ConfigError, LinguaError

logger = logging.getLogger(__name__)


@dataclass
class DistributedArgs:
    dp_shard: int = 1  # FSDP shard group size
    dp_replicate: int = 1  # replicas (DDP, or HSDP's outer dim); inferred from the world size when left at 1
    tp_size: int = 1  # tensor parallel: each block sharded over tp_size ranks (the model's TP plan)
    cp_size: int = 1  # context parallel: the sequence split over cp ranks
    pp_size: int = 1  # pipeline parallel: the layers split over pp ranks (outermost mesh dim)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zbv | dualpipev
    pp_microbatches: int = 0  # microbatches per step and pipeline; 0: one per pipeline stage
    pp_stages_per_rank: int = 0  # 0: what the schedule needs (1 for gpipe/1f1b, 2 for the others)
    ep_size: int = 1  # expert parallel (apps/moe): experts sharded over groups of ep_size data-parallel ranks
    fsdp_type: str = "full_shard"  # full_shard (FSDP2) | no_shard (DDP-style replicate)
    model_dtype: str = "auto"  # auto | bf16 | fp32: auto takes bf16 only where the hardware runs it natively
    compile: Union[bool, str] = "auto"  # auto | true | false: see lingua.distributed.parallelize.resolve_compile
    # activation checkpointing of every block: none | full (keep its input, recompute the rest in backward) |
    # selective (keep matmul and attention outputs too, recompute the pointwise ops)
    ac: str = "none"
    float8_recipe: Optional[str] = None  # torchao float8 (GPU only): tensorwise | rowwise | rowwise_with_gw_hp
    matmul_allow_tf32: bool = True  # CUDA: fp32 matmuls on TF32 tensor cores (Ampere and later)
    # free each block's gathered weights after its forward (false: keep them for backward: more memory, fewer
    # all-gathers)
    fsdp_reshard_after_forward: bool = True
    loss_parallel: bool = True  # with TP: keep logits sharded over the vocabulary for the loss
    device: str = "auto"  # auto | cpu | cuda
    backend: Optional[str] = None  # override: gloo | nccl
    timeout_s: int = 600  # a collective that waits longer (e.g. a dead peer) raises instead of hanging

    def __post_init__(self):
        if self.ac not in AC_MODES:
            raise ConfigError(f"distributed.ac={self.ac!r} is not one of {', '.join(AC_MODES)}")


FLOAT8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
AC_MODES = ("none", "full", "selective")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outer to inner


class MeshShape(NamedTuple):
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int


@dataclass
class DistEnv:
    launcher: str  # single | torchrun | slurm
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def _slurm_master_addr(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):  # no scontrol (or no slurm.conf) here: parse it
        first = re.split(r",(?![^\[]*\])", nodelist)[0]  # "node[01-02,05],gpu7" -> "node[01-02,05]"
        m = re.match(r"([^\[]*)\[([^\],-]+)", first)  # -> "node" + "01"
        return (m.group(1) + m.group(2) if m else first) or "127.0.0.1"


def detect_env(environ=None) -> DistEnv:
    """Read the launcher's variables; torchrun wins over SLURM (torchrun inside an allocation)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            "torchrun",
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        job_id = int(env["SLURM_JOB_ID"])
        return DistEnv(
            "slurm",
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or _slurm_master_addr(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
        )
    return DistEnv("single")


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"distributed.device must be auto, cpu or cuda, got '{requested}'")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LinguaError("distributed.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(device: torch.device, override: Optional[str]) -> str:
    if override:
        return override
    return "nccl" if device.type == "cuda" else "gloo"


# What a collective raises when a peer died (connection closed) or hung (timeout), as gloo and nccl word it.
PEER_FAILURE_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                        "socket closed", "nccl communicator was aborted", "watchdog")


@dataclass
class DistState:
    env: DistEnv
    device: torch.device
    mesh: Optional["torch.distributed.device_mesh.DeviceMesh"]
    dp_rank: int
    dp_size: int
    tp_size: int
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0
    loss_parallel: bool = False  # TP keeps the logits sharded over the vocabulary: forward + backward in loss_context
    timeout_s: int = 600
    store: Optional["dist.Store"] = None  # the process group's key-value store (this attempt's prefix)
    watchdog: Optional[object] = None  # lingua.distributed.watchdog.Watchdog, set by the train loop: names the laggards

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or `op`) over every rank; a no-op on one process."""
        if dist.is_initialized():
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def loss_context(self):
        """Where the loss is computed and differentiated: torch's loss_parallel under TP, else nothing."""
        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def peer_failures_as_errors(self):
        """A collective that fails because a peer died or hung becomes one readable LinguaError on this rank."""
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            msg = str(e).strip()
            if self.world_size == 1 or not any(m in msg.lower() for m in PEER_FAILURE_MARKERS):
                raise
            first = next((line.strip() for line in msg.splitlines() if line.strip()), type(e).__name__)
            what = "a collective failed, another rank died or hung"
            if self.watchdog is not None:
                raise LinguaError(f"{self.watchdog.describe(what)}: {first[:200]}") from None
            raise LinguaError(f"rank {self.rank}: {what} (distributed.timeout_s={self.timeout_s}): "
                              f"{first[:300]}") from None

    def close(self):
        """Tear the process group down; safe to call twice and after a failed collective."""
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a broken group must not hide the error that broke it
                logger.warning(f"destroy_process_group failed: {e}")


def resolve_mesh_shape(args: DistributedArgs, world_size: int) -> MeshShape:
    """pp x dp_replicate x dp_shard x cp x tp: dp_replicate is inferred when left at 1; anything else must multiply
    to the world."""
    for key in ("dp_shard", "dp_replicate", "tp_size", "cp_size", "pp_size"):
        if getattr(args, key) < 1:
            raise ConfigError(f"distributed.{key} must be >= 1, got {getattr(args, key)}")
    pp, rep, shard, cp, tp = args.pp_size, args.dp_replicate, args.dp_shard, args.cp_size, args.tp_size
    if rep == 1 and world_size % (pp * shard * cp * tp) == 0:
        rep = world_size // (pp * shard * cp * tp)
    if pp * rep * shard * cp * tp != world_size:
        raise ConfigError(
            f"world size {world_size} does not factor into pp_size={pp} x dp_replicate={args.dp_replicate} x "
            f"dp_shard={shard} x cp_size={cp} x tp_size={tp}"
        )
    check_pipeline_args(args)
    if args.fsdp_type not in ("full_shard", "no_shard"):
        raise ConfigError(f"distributed.fsdp_type must be full_shard or no_shard, got '{args.fsdp_type}'")
    if args.fsdp_type == "no_shard" and shard > 1:
        raise ConfigError(f"distributed.fsdp_type=no_shard needs dp_shard=1 (got dp_shard={shard}); use dp_replicate")
    if args.compile not in (True, False, "auto"):
        raise ConfigError(f"distributed.compile must be auto, true or false, got {args.compile!r}")
    if args.compile is True and tp > 1:
        # torch 2.13: AOTAutograd's backward hands DTensor's redistribute a plain tensor in our TP blocks
        # ("'Tensor' object has no attribute '_local_tensor'"), with or without sequence parallel.
        raise ConfigError(f"distributed.compile=true with distributed.tp_size={tp} fails in backward under torch "
                          f"{torch.__version__}: set distributed.compile=false or tp_size=1")
    if args.ep_size < 1 or (rep * shard) % args.ep_size or (args.ep_size > 1 and (tp > 1 or
                                                                                args.fsdp_type != "full_shard")):
        raise ConfigError(f"distributed.ep_size={args.ep_size} must divide the {rep * shard} data-parallel ranks, "
                          "with tp_size=1 and fsdp_type=full_shard")
    if args.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be > 0, got {args.timeout_s}")
    if args.float8_recipe is not None and args.float8_recipe not in FLOAT8_RECIPES:
        raise ConfigError(f"distributed.float8_recipe must be one of {', '.join(FLOAT8_RECIPES)} or null, "
                          f"got '{args.float8_recipe}'")
    return MeshShape(pp, rep, shard, cp, tp)


def check_pipeline_args(args: DistributedArgs) -> None:
    if args.pp_schedule not in PP_SCHEDULES:
        raise ConfigError(f"distributed.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got '{args.pp_schedule}'")
    for key in ("pp_microbatches", "pp_stages_per_rank"):
        if getattr(args, key) < 0:
            raise ConfigError(f"distributed.{key} must be >= 0 (0: automatic), got {getattr(args, key)}")


def attempt_store(env: DistEnv, timeout_s: int, environ=None) -> "dist.Store":
    """The process group's store, under a key prefix of its own per launch of the job (`lingua/gen_<n>/`).

    torchrun's workers share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE=True), which outlives a restart, and
    torch adds no per-attempt prefix: restarted ranks read the dead ranks' gloo addresses, still in the store, and
    fail with "Connection refused" (or hang on a stale barrier count). Elsewhere rank 0 hosts a fresh store."""
    e = os.environ if environ is None else environ
    agent = e.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr or "127.0.0.1", env.master_port or 29500, env.world_size,
                          is_master=not agent and env.rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                          multi_tenant=not agent)
    return dist.PrefixStore(f"lingua/gen_{agree_generation(store, env.rank, timeout_s)}/", store)


def agree_generation(store: "dist.Store", rank: int, timeout_s: float) -> int:
    """A number every rank of this launch agrees on and no earlier launch used: rank 0 draws the next one, the others
    wait for one above the number their own predecessor (same rank, earlier launch) used. torchrun's restart count
    would not do: a node whose workers looked alive to its agent restarts without counting, and the counts then
    differ between nodes. A rank whose predecessor died before it got its number may take the last launch's: its
    init then fails at once (stale addresses), and the next launch agrees."""
    used = f"lingua/rank_gen/{rank}"
    before = int(store.get(used)) if store.check([used]) else 0
    if rank == 0:
        gen = store.add("lingua/generation", 1)
        store.set("lingua/current", str(gen))
    else:
        deadline = time.monotonic() + timeout_s
        while (gen := int(store.get("lingua/current")) if store.check(["lingua/current"]) else 0) <= before:
            if time.monotonic() > deadline:
                raise LinguaError(f"rank {rank}: rank 0 did not start within distributed.timeout_s={timeout_s}")
            time.sleep(0.01)
    store.set(used, str(gen))
    return gen


def init_distributed(args: DistributedArgs, environ=None) -> DistState:
    env = detect_env(environ)
    shape = resolve_mesh_shape(args, env.world_size)
    device = pick_device(args.device, env.local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.matmul_allow_tf32
        torch.backends.cudnn.allow_tf32 = args.matmul_allow_tf32
    if env.world_size == 1:
        return DistState(env, device, None, 0, 1, 1, timeout_s=args.timeout_s)
    os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(env.master_port or 29500))
    store = None
    if not dist.is_initialized():
        store = attempt_store(env, args.timeout_s, environ)
        dist.init_process_group(
            backend=pick_backend(device, args.backend),
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=args.timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, tuple(shape), mesh_dim_names=MESH_DIMS)
    # The data loader's rank counts over both data-parallel dims, never over pp, cp or tp (lingua issue #58): every
    # pipeline stage, context-parallel and tensor-parallel rank of one data-parallel replica reads the same batches.
    dp_rank = mesh.get_local_rank("dp_replicate") * shape.dp_shard + mesh.get_local_rank("dp_shard")
    return DistState(env, device, mesh, dp_rank, shape.dp_replicate * shape.dp_shard, shape.tp,
                     tp_rank=mesh.get_local_rank("tp"), pp_size=shape.pp, pp_rank=mesh.get_local_rank("pp"),
                     cp_size=shape.cp, cp_rank=mesh.get_local_rank("cp"),
                     loss_parallel=shape.tp > 1 and args.loss_parallel, timeout_s=args.timeout_s, store=store)
