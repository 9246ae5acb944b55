"""lingua.distributed.mesh end to end: real torchrun processes on CPU with gloo, training the tiny model of conftest.py.

Equivalence. The equivalence runs use `tests.dist_helpers --global-batch`: every rank reads the single-process stream
of global batches and keeps its rows, so both runs see the same global batch at every step whatever the loader does
(the real loader gives the same global batches on any number of ranks too; tests/test_data_invariance.py checks
that through the real loader and loop). The loss and the gradient norm of every step must then agree within

    LOSS_ATOL = 1e-4 (loss ~5.5 nats),  GNORM_RTOL = 1e-4.

Why that tolerance: the layouts compute the same math in a different fp32 summation order (the gradient is the
average of per-rank half-batch means instead of one full-batch mean; TP splits the matmul reductions and the softmax
over the vocabulary across ranks; FSDP reduce-scatters in fp32). That moves each loss by ~1e-7 relative; over the 6
steps we measured at most 5e-7 absolute on the loss, so 1e-4 leaves 200x headroom for other CPUs and BLAS builds.
Real bugs are far outside it: a rank reading the wrong rows, a missing all-reduce or a broken tie changes the loss by
>1e-2 from step 2 on. Adam is invariant to the gradient's scale (a gradient twice too large gives the same losses),
which is why the gradient norm before clipping is compared too: a wrong averaging factor shows there at step 1.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lingua.args import load_config
from lingua.checkpoint.manager import list_checkpoints
from lingua.distributed.mesh import (
    DistributedArgs,
    detect_env,
    init_distributed,
    resolve_mesh_shape,
)
from lingua.distributed.parallelize import parallelize_decoder
from lingua.errors import ConfigError, LinguaError
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.models.transformer.parallelize import apply_transformer_tp
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, build_model, train
from tests.conftest import ROOT, assert_same_weights, cut_at, read_jsonl, tiny_overrides
from tests.dist_helpers import ROOT as HELPER_ROOT
from tests.dist_helpers import free_port, torchrun, torchrun_cmd

assert ROOT == HELPER_ROOT

LOSS_ATOL = 1e-4
GNORM_RTOL = 1e-4
STEPS = 6
EVERY = 3  # checkpoints at steps 3 and 6; the reshard tests resume from 3
BATCH = 4  # global batch: 4 sequences of 32 tokens


def cfg(corpus, dump_dir, **extra) -> list[str]:
    base = dict(steps=STEPS, checkpoint__dump__every=EVERY, optim__warmup=0)
    return tiny_overrides(corpus, dump_dir, **{**base, **extra})


def curve(dump_dir) -> dict:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(Path(dump_dir) / "metrics.jsonl")}


def assert_same_curve(ref: dict, got: dict, steps=range(1, STEPS + 1)):
    for s in steps:
        (l0, g0), (l1, g1) = ref[s], got[s]
        assert abs(l0 - l1) < LOSS_ATOL, f"step {s}: loss {l1} vs single-process {l0}"
        assert abs(g0 - g1) <= GNORM_RTOL * g0, f"step {s}: grad norm {g1} vs single-process {g0}"


def single_process_init(overrides: list[str]) -> dict:
    """The weights a 1-process run starts from (train.build_model without a mesh)."""
    args = load_config(TrainArgs, overrides)
    state = init_distributed(DistributedArgs(device="cpu"), environ={})
    model = build_model(args, TRANSFORMER_SPEC, state, torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}




def two_node_launch(overrides: list[str], helper_flags: list[str]) -> None:
    """The job as two torchrun invocations (--nnodes 2, --node_rank 0 and 1, one process each) on the loopback."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(torchrun_cmd(1, overrides, helper_flags, nnodes=2, node_rank=n, port=port),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]


def records(rec_dir) -> list[dict]:
    files = sorted(Path(rec_dir).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]


def dcp_contents(ckpt: Path, tmp: Path) -> dict:
    """Everything a DCP checkpoint holds, as full tensors keyed by flat names."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tests.dist_helpers import _flat

    dcp_to_torch_save(str(ckpt), str(tmp / "full.pt"))
    return _flat(torch.load(tmp / "full.pt", weights_only=False))


def assert_loaded_equals_checkpoint(rec_dir: Path, ckpt: Path, tmp: Path):
    """The model and optimizer right after loading (gathered to full tensors) equal what the checkpoint holds."""
    saved = dcp_contents(ckpt, tmp)
    loaded = torch.load(Path(rec_dir) / "loaded.pt", weights_only=False)
    model = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    assert_same_weights(model, loaded["model"])
    optim = {k[len("optim."):]: v for k, v in saved.items() if k.startswith("optim.state.")}
    got = {k: v for k, v in loaded["optim"].items() if k.startswith("state.")}
    assert optim.keys() == got.keys() and optim, set(optim) ^ set(got)
    for k in optim:
        assert torch.equal(torch.as_tensor(optim[k]), torch.as_tensor(got[k])), k




# ---------------------------------------------------------------- the runs several tests compare (once per module)


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """Lazily computed and cached: name -> run dir. Tied weights for DP layouts, untied for TP (lingua's rule)."""
    root = tmp_path_factory.mktemp("dist_runs")
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        d = root / name
        tied = dict(model__weight_tying=True)
        if name == "ref_tied":
            train(load_config(TrainArgs, cfg(tiny_corpus, d, data__batch_size=BATCH, **tied)), TRANSFORMER_SPEC)
        elif name == "ref":
            train(load_config(TrainArgs, cfg(tiny_corpus, d, data__batch_size=BATCH)), TRANSFORMER_SPEC)
        elif name == "full_shard":  # launched as two nodes: test_two_node_launch_on_one_machine_agrees
            two_node_launch(cfg(tiny_corpus, d, data__batch_size=BATCH // 2, distributed__dp_shard=2, **tied),
                            ["--global-batch", "--record", str(d / "rec")])
        elif name == "no_shard":
            torchrun(2, cfg(tiny_corpus, d, data__batch_size=BATCH // 2, distributed__fsdp_type="no_shard", **tied),
                     ["--global-batch", "--record", str(d / "rec")])
        elif name == "tp":
            torchrun(2, cfg(tiny_corpus, d, data__batch_size=BATCH, distributed__tp_size=2),
                     ["--global-batch", "--record", str(d / "rec")])
        cache[name] = d
        return d

    return get


# ---------------------------------------------------------------- pure functions: environment and mesh


def test_detect_env_reads_torchrun_then_slurm_then_single():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "123",
                      "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ("torchrun", 3, 4, 1, "h", 123)
    env = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
                      "SLURM_JOB_NODELIST": "node[01-02]"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 8, 1)
    assert env.master_addr == "node01" and env.master_port == 20000 + 1234  # scontrol missing: first host
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "1"}).launcher == "single"
    assert detect_env({}).launcher == "single"


@pytest.mark.parametrize("world, kw, shape", [
    (2, dict(dp_shard=2), (1, 1, 2, 1, 1)),
    (2, dict(), (1, 2, 1, 1, 1)),  # dp_replicate inferred from the world size
    (4, dict(dp_shard=2, tp_size=2), (1, 1, 2, 1, 2)),
    (8, dict(dp_shard=2, tp_size=2), (1, 2, 2, 1, 2)),
    (4, dict(dp_replicate=2, dp_shard=2), (1, 2, 2, 1, 1)),
    (16, dict(pp_size=2, dp_shard=2, cp_size=2), (2, 2, 2, 2, 1)),  # pp x dp_replicate x dp_shard x cp x tp
    (4, dict(pp_size=2, tp_size=2), (2, 1, 1, 1, 2)),
])
def test_mesh_shape(world, kw, shape):
    assert resolve_mesh_shape(DistributedArgs(**kw), world) == shape


@pytest.mark.parametrize("world, kw, message", [
    (6, dict(dp_shard=4), "world size 6 does not factor into pp_size=1 x dp_replicate=1 x dp_shard=4 x cp_size=1"),
    (4, dict(dp_replicate=3, tp_size=2), "world size 4 does not factor into pp_size=1 x dp_replicate=3 x dp_shard=1"),
    (6, dict(pp_size=4), "world size 6 does not factor into pp_size=4 x dp_replicate=1"),
    (4, dict(pp_size=2, cp_size=3), "x cp_size=3 x tp_size=1"),
    (2, dict(pp_size=2, pp_schedule="zb"), "distributed.pp_schedule must be one of gpipe, 1f1b,"),
    (1, dict(cp_size=0), "distributed.cp_size must be >= 1"),
    (2, dict(dp_shard=2, fsdp_type="no_shard"), "fsdp_type=no_shard needs dp_shard=1"),
    (1, dict(fsdp_type="zero3"), "fsdp_type must be full_shard or no_shard"),
    (1, dict(tp_size=0), "distributed.tp_size must be >= 1"),
    (1, dict(float8_recipe="fp4"), "float8_recipe must be one of"),
    (2, dict(tp_size=2, compile=True), "distributed.compile=true with distributed.tp_size=2 fails in backward"),
])
def test_bad_layout_is_one_line_error(world, kw, message):
    with pytest.raises(ConfigError) as e:
        resolve_mesh_shape(DistributedArgs(**kw), world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_single_process_has_no_process_group():
    state = init_distributed(DistributedArgs(device="cpu"), environ={})
    assert state.mesh is None and (state.dp_rank, state.dp_size, state.tp_size) == (0, 1, 1)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match="world size 1 does not factor"):
        init_distributed(DistributedArgs(dp_shard=2), environ={})


def test_float8_without_a_gpu_is_a_clear_error():
    with torch.device("meta"):
        model = Transformer(TransformerArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64))
    with pytest.raises(LinguaError, match="float8_recipe=rowwise needs a CUDA GPU"):
        parallelize_decoder(model, None, DistributedArgs(float8_recipe="rowwise", device="cpu"))


class _FakeMesh:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


@pytest.mark.parametrize("kw, tp, message", [
    (dict(weight_tying=True), 2, "weight_tying=true cannot be combined with distributed.tp_size > 1"),
    (dict(n_heads=4, n_kv_heads=2), 4, "tp_size=4 does not divide model.n_kv_heads (2)"),
    (dict(n_heads=4), 3, "tp_size=3 does not divide model.n_heads (4)"),
])
def test_tensor_parallel_checks_the_model_first(kw, tp, message):
    with torch.device("meta"):
        model = Transformer(TransformerArgs(**{"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 64, **kw}))
    with pytest.raises(ConfigError) as e:
        apply_transformer_tp(model, _FakeMesh(tp), loss_parallel=True)
    assert message in str(e.value)


# ---------------------------------------------------------------- one process: activation checkpointing and compile


def _one_process(corpus, d, **extra) -> dict:
    train(load_config(TrainArgs, cfg(corpus, d, checkpoint__dump__every=0, eval__at_end=False, **extra)),
          TRANSFORMER_SPEC)
    return curve(d)


def test_activation_checkpointing_full_and_selective_match_eager(tiny_corpus, tmp_path, runs):
    # Recomputation replays the same ops in the same order: equal up to the stated tolerance (in practice exact).
    ref = curve(runs("ref"))
    assert_same_curve(ref, _one_process(tiny_corpus, tmp_path / "ac", distributed__ac="full"))
    assert_same_curve(ref, _one_process(tiny_corpus, tmp_path / "sac",
                                        distributed__ac="selective"))


@pytest.mark.slow
def test_compile_matches_eager(tiny_corpus, tmp_path, runs):
    # Inductor fuses pointwise ops, which may change fp32 rounding: same tolerance as the layouts.
    ref = curve(runs("ref"))
    assert_same_curve(ref, _one_process(tiny_corpus, tmp_path / "compile", distributed__compile=True))


# ---------------------------------------------------------------- two processes: equivalence with one process


@pytest.mark.parametrize("layout", ["full_shard", "no_shard", "tp"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_corpus, runs, layout):
    ref = runs("ref" if layout == "tp" else "ref_tied")
    d = runs(layout)
    assert_same_curve(curve(ref), curve(d))
    # Evaluation at the end: sharded forwards (vocab-sharded logits under TP), batches split over dp ranks.
    (e0,), (e1,) = read_jsonl(ref / "metrics.eval.jsonl"), read_jsonl(d / "metrics.eval.jsonl")
    assert e0["alpha/tokens"] == e1["alpha/tokens"] and abs(e0["alpha/nll"] - e1["alpha/nll"]) < LOSS_ATOL
    # Initialised after sharding, the model starts from exactly the single-process weights.
    init = torch.load(d / "rec" / "init.pt", weights_only=True)
    assert_same_weights(single_process_init(cfg(tiny_corpus, ref, **({} if layout == "tp" else
                                                                         {"model__weight_tying": True}))), init)
    # Data-parallel rank and size count data-parallel ranks only (lingua issue #58).
    recs = records(d / "rec")
    expected = [(0, 1), (0, 1)] if layout == "tp" else [(0, 2), (1, 2)]
    assert [(r["dp_rank"], r["dp_size"]) for r in recs] == expected
    if layout == "tp":
        assert [r["tp_rank"] for r in recs] == [0, 1]
        assert recs[0]["batches"] == recs[1]["batches"]  # both tp ranks read the same batches
    else:
        assert not set(recs[0]["batches"]) & set(recs[1]["batches"])  # each dp rank its own rows
    if layout == "full_shard":  # every parameter is split between the two ranks: nobody holds the whole model
        total = sum(v.numel() for k, v in init.items() if k != "output.weight")
        assert sum(r["local_numel"] for r in recs) == total
        assert all(r["local_numel"] <= total // 2 + 64 for r in recs)


def test_weight_tying_stays_tied_under_fsdp(runs, tmp_path):
    # lingua issue #74: to_empty after fully_shard used to leave the output projection as a separate, uninitialised
    # parameter. Trained for 6 steps, the two must still be one matrix.
    d = runs("full_shard")
    final = dcp_contents(list_checkpoints(d / "checkpoints")[-1], tmp_path)
    emb, out = final["model.tok_embeddings.weight"], final["model.output.weight"]
    assert torch.equal(emb, out)
    init = torch.load(d / "rec" / "init.pt", weights_only=True)
    assert torch.equal(init["output.weight"], init["tok_embeddings.weight"])
    assert not torch.equal(emb, init["tok_embeddings.weight"])  # it did train


def test_two_node_launch_on_one_machine_agrees(runs):
    """Two torchrun invocations (--nnodes 2 --node_rank 0/1, one process each) rendezvous on the loopback: the
    full_shard run every FSDP test here compares is launched that way (runs, two_node_launch)."""
    d = runs("full_shard")
    recs = records(d / "rec")
    assert [(r["rank"], r["world_size"], r["dp_rank"], r["dp_size"]) for r in recs] == [(0, 2, 0, 2), (1, 2, 1, 2)]
    assert len({r["pid"] for r in recs}) == 2
    assert_same_curve(curve(runs("ref_tied")), curve(d))


# ---------------------------------------------------------------- data loader under two ranks, elastic resume


def test_two_ranks_read_disjoint_documents_then_resume_on_one(tiny_corpus, tmp_path):
    import hashlib

    from lingua.data.loader import traced_batches

    d = tmp_path / "real_loader"
    overrides = cfg(tiny_corpus, d, data__batch_size=2, distributed__dp_shard=2, steps=4, checkpoint__dump__every=2,
                    checkpoint__async_save=True)  # step 2 saved asynchronously (its COMPLETE polled), 4 waited for
    torchrun(2, overrides, ["--record", str(d / "rec")])  # the production loader: each rank its own streams
    recs = records(d / "rec")
    assert [(r["dp_rank"], r["dp_size"]) for r in recs] == [(0, 2), (1, 2)]
    args = load_config(TrainArgs, overrides).data
    seen = []
    for r in recs:
        it = traced_batches(args, r["dp_rank"], r["dp_size"])
        docs = set()
        for want in r["batches"]:
            batch, refs, _ = next(it)
            assert hashlib.sha1(batch["input"].tobytes()).hexdigest() == want  # what the rank really trained on
            docs |= {tuple(s[:3]) for row in refs for s in row}  # (source, epoch, document)
        seen.append(docs)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # each rank hashed its own files into the COMPLETE marker (tests/test_ckpt_integrity.py has the rest)
    for step in (2, 4):
        sums = json.loads((d / "checkpoints" / f"{step:010d}" / "COMPLETE").read_text())["sha256"]
        assert {"__0_0.distcp", "__1_0.distcp", "train_state_00000.json", "train_state_00001.json",
                ".metadata"} <= set(sums)

    # Elastic resume: the 2-rank checkpoint continues on one process; the loader merges both ranks' streams.
    result = train(load_config(TrainArgs, cfg(tiny_corpus, d, data__batch_size=4, steps=6,
                                              checkpoint__dump__every=4)), TRANSFORMER_SPEC)
    assert result["status"] == "done" and result["step"] == 6
    rows = read_jsonl(d / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["tokens_seen"] == 4 * 4 * 32 + 2 * 4 * 32


# ---------------------------------------------------------------- checkpoints across layouts


def _resume(tiny_corpus, src: Path, dst: Path, nproc: int, **layout) -> Path:
    cut = cut_at(src, dst, EVERY)
    tied = {"model__weight_tying": True} if "distributed__tp_size" not in layout else {}
    dp = nproc // layout.get("distributed__tp_size", 1)
    overrides = cfg(tiny_corpus, cut, data__batch_size=BATCH // dp, **tied, **layout)
    if nproc == 1:
        subprocess.run([sys.executable, "-m", "tests.dist_helpers", "--global-batch", "--record", str(cut / "rec2"),
                        "--"] + overrides, cwd=ROOT, check=True, capture_output=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    else:
        torchrun(nproc, overrides, ["--global-batch", "--record", str(cut / "rec2")])
    return cut


def test_reshard_two_processes_fsdp_to_one(tiny_corpus, tmp_path, runs):
    d = _resume(tiny_corpus, runs("full_shard"), tmp_path / "to1", 1)
    assert_loaded_equals_checkpoint(d / "rec2", d / "checkpoints" / f"{EVERY:010d}", tmp_path)
    assert_same_curve(curve(runs("ref_tied")), curve(d))  # steps 4-6 continue exactly the single-process curve


def test_reshard_one_process_to_two_fsdp(tiny_corpus, tmp_path, runs):
    d = _resume(tiny_corpus, runs("ref_tied"), tmp_path / "to2", 2, distributed__dp_shard=2)
    assert_loaded_equals_checkpoint(d / "rec2", d / "checkpoints" / f"{EVERY:010d}", tmp_path)
    assert_same_curve(curve(runs("ref_tied")), curve(d))


# ---------------------------------------------------------------- a rank that dies or hangs


def test_hung_rank_makes_the_others_fail_within_the_timeout(tiny_corpus, tmp_path):
    d = tmp_path / "hang"
    timeout_s = 10
    t0 = time.time()
    out = torchrun(2, cfg(tiny_corpus, d, steps=50, distributed__dp_shard=2, distributed__timeout_s=timeout_s),
                   ["--hang-at", "3", "--fail-rank", "1"], check=False, timeout=300)
    elapsed = time.time() - t0
    assert out.returncode != 0
    assert "[test] rank 1 hangs at step 3" in out.stdout
    # the line names the step, the phase rank 0 waited in and the rank that kept it waiting (distributed/watchdog.py)
    line = next((x for x in out.stdout.splitlines() if x.startswith("error: rank 0: ")), out.stdout[-3000:])
    assert "at step 3 (" in line and "ranks that did not arrive: 1 (step 3 data)" in line, line  # alive: it beats
    assert f"(distributed.timeout_s={timeout_s})" in line, line
    assert elapsed < 120, elapsed  # startup + 2 steps + the 10 s timeout, not a hang


@pytest.mark.slow
def test_killed_worker_of_a_two_node_job_stops_the_other_node(tiny_corpus, tmp_path):
    d = tmp_path / "kill"
    timeout_s = 30
    overrides = cfg(tiny_corpus, d, steps=100000, checkpoint__dump__every=0, distributed__dp_shard=2,
                    distributed__timeout_s=timeout_s)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(torchrun_cmd(1, overrides, ["--record", str(d / "rec")], nnodes=2, node_rank=n,
                                           port=port),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((d / "metrics.jsonl").exists()
                                              and len(read_jsonl(d / "metrics.jsonl")) >= 3):
            assert all(p.poll() is None for p in procs), "a node exited before training"
            time.sleep(0.2)
        os.kill(int((d / "rec" / "pid1").read_text()), signal.SIGKILL)  # the worker of node 1, not its torchrun
        t0 = time.time()
        out0 = procs[0].communicate(timeout=timeout_s + 90)[0]
        elapsed = time.time() - t0
        procs[1].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert elapsed < timeout_s + 60, elapsed
    assert "error: rank 0: a collective failed, another rank died or hung" in out0, out0[-3000:]


# ---------------------------------------------------------------- four processes (slow: 2 cores for 4 ranks)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp_type", ["full_shard", "no_shard"])
def test_four_processes_2d_dp_x_tp_match_one(tiny_corpus, tmp_path, runs, fsdp_type):
    """2 x 2: FSDP x TP (full_shard, dp_shard=2) or DDP x TP (no_shard, dp_replicate=2)."""
    d = tmp_path / "2d"
    dp = {"distributed__dp_shard": 2} if fsdp_type == "full_shard" else {"distributed__dp_replicate": 2}
    torchrun(4, cfg(tiny_corpus, d, data__batch_size=BATCH // 2, distributed__tp_size=2,
                    distributed__fsdp_type=fsdp_type, **dp),
             ["--global-batch", "--record", str(d / "rec")])
    ref = runs("ref")
    assert_same_curve(curve(ref), curve(d))
    assert_same_weights(single_process_init(cfg(tiny_corpus, ref)), torch.load(d / "rec" / "init.pt", weights_only=True))
    recs = records(d / "rec")
    assert [(r["dp_rank"], r["dp_size"], r["tp_rank"]) for r in recs] == [(0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1)]
    assert recs[0]["batches"] == recs[1]["batches"] and not set(recs[0]["batches"]) & set(recs[2]["batches"])


@pytest.mark.slow
def test_four_processes_hsdp_match_one(tiny_corpus, tmp_path, runs):
    d = tmp_path / "hsdp"
    torchrun(4, cfg(tiny_corpus, d, data__batch_size=BATCH // 4, distributed__dp_shard=2,
                    distributed__dp_replicate=2, model__weight_tying=True),
             ["--global-batch", "--record", str(d / "rec")])
    assert_same_curve(curve(runs("ref_tied")), curve(d))
    assert [(r["dp_rank"], r["dp_size"]) for r in records(d / "rec")] == [(0, 4), (1, 4), (2, 4), (3, 4)]


@pytest.mark.slow
def test_reshard_two_processes_fsdp_to_four_2d(tiny_corpus, tmp_path, runs):
    # The 2-process run is tied (FSDP); TP needs an untied model, so the 2D run resumes an untied FSDP run.
    src = tmp_path / "fsdp_untied"
    torchrun(2, cfg(tiny_corpus, src, data__batch_size=BATCH // 2, distributed__dp_shard=2), ["--global-batch"])
    assert_same_curve(curve(runs("ref")), curve(src))
    d = _resume(tiny_corpus, src, tmp_path / "to4", 4, distributed__dp_shard=2, distributed__tp_size=2)
    assert_loaded_equals_checkpoint(d / "rec2", d / "checkpoints" / f"{EVERY:010d}", tmp_path)
    assert_same_curve(curve(runs("ref")), curve(d))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp_compile_sac", "tp_sac"])
def test_two_processes_with_ac_and_compile_match_one(tiny_corpus, tmp_path, runs, layout):
    d = tmp_path / layout
    if layout == "fsdp_compile_sac":
        extra = dict(data__batch_size=BATCH // 2, distributed__dp_shard=2, model__weight_tying=True,
                     distributed__compile=True, distributed__ac="selective")
    else:  # compile is refused with TP (see test_bad_layout_is_one_line_error)
        extra = dict(data__batch_size=BATCH, distributed__tp_size=2, distributed__ac="selective")
    torchrun(2, cfg(tiny_corpus, d, eval__at_end=False, **extra), ["--global-batch"])
    assert_same_curve(curve(runs("ref_tied" if "fsdp" in layout else "ref")), curve(d))


@pytest.mark.slow
def test_7b_config_never_materialises_on_one_rank():
    """Rank 0 of a 64-rank FSDP job (a fake process group: collectives are no-ops, sharding is real) builds and
    initialises the 7B config holding 1/64 of it: ~0.47 GB of fp32 parameters instead of 30 GB."""
    out = subprocess.run([sys.executable, "-m", "tests.dist_helpers", "--fake-world", "64", "--",
                          "config=apps/main/configs/llama_7B.yaml"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 6e9 < r["total"] < 8e9
    assert r["local"] <= r["total"] / 64 * 1.01
    # The whole model is 28 GiB in fp32; the rank grows by its shard (0.44 GiB) plus init scratch and allocator slack.
    assert r["peak_rss_mb_after"] - r["peak_rss_mb_before"] < 1500, r


# ---------------------------------------------------------------- the README's command, on the prepared corpus


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "data" / "shakespeare").is_dir() or not (ROOT / "tokenizers").is_dir(),
                    reason="needs data/ and tokenizers/ from setup/prepare_data.py and setup/train_tokenizer.py")
def test_debug_config_trains_on_two_processes(tmp_path):
    out = subprocess.run(
        # compiled FSDP training has its own tests (test_two_processes_with_ac_and_compile_match_one)
        torchrun_cmd(2, ["config=apps/main/configs/debug.yaml", "distributed.dp_shard=2", "steps=4",
                         "distributed.compile=false",
                         f"dump_dir={tmp_path}", "logging.freq=1", "eval.max_docs=4"], module="apps.main.train"),
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    # tied embeddings + zero-init blocks start as norm(e) @ E^T, which favours the input token: loss ~16 at step 1
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and losses[-1] < 9 and losses[-1] < losses[0]


@pytest.mark.slow
def test_preemption_of_one_rank_stops_both_at_the_same_step_with_a_save(tiny_corpus, tmp_path):
    """Only rank 1 gets SIGUSR2 (during step 5) and no step reads the device (logging every 100): the host flag's
    all-reduce still makes both ranks save step 6 and stop there."""
    d = tmp_path / "preempt"
    out = torchrun(2, cfg(tiny_corpus, d, steps=50, logging__freq=100, checkpoint__dump__every=0,
                          distributed__dp_shard=2), ["--signal-at", "5", "--fail-rank", "1"], timeout=300)
    assert [p.name for p in list_checkpoints(d / "checkpoints")] == ["0000000006"], out.stdout[-3000:]
    assert "preempted at step 6" in out.stdout  # rank 0 logs; rank 1 exited 0 too (a disagreement would hang the save)
    assert [r["step"] for r in read_jsonl(d / "metrics.jsonl")] == [6]


@pytest.mark.parametrize("app", ["main", "moe"])
def test_float8_converts_only_linears_scaled_mm_can_take(app):
    """The debug models' real shapes, built on meta: every 16-aligned projection converts; the vocab projection and
    the MoE router (dim -> 8 experts, which _scaled_mm would reject) stay in high precision."""
    from lingua.distributed.parallelize import float8_filter
    from lingua.models.spec import get_spec
    from lingua.train.loop import train_args_cls

    spec = get_spec({"main": "lingua.models.transformer.spec:TRANSFORMER_SPEC", "moe": "apps.moe.model:MOE_SPEC"}[app])
    args = load_config(train_args_cls(spec), [f"config={ROOT}/apps/{app}/configs/debug.yaml"])
    with torch.device("meta"):
        model = spec.build(args.model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = sorted(n.split(".")[-1] for n, m in linears.items() if not float8_filter(m, n))
    converted = {n.split(".")[-1] for n, m in linears.items() if float8_filter(m, n)}
    assert converted == {"wq", "wk", "wv", "wo"} | ({"w1", "w2"} if app == "main" else set())  # relu2 MLP
    assert kept == (["output"] if app == "main" else ["output"] + ["router"] * args.model.n_layers)
    assert not float8_filter(torch.nn.Linear(256, 8), "layers.0.feed_forward.router")


def test_compile_auto_on_cuda_names_what_is_missing():
    from lingua.distributed.parallelize import cuda_toolchain_missing

    assert cuda_toolchain_missing(True, "/usr/bin/cc", __file__) is None
    assert cuda_toolchain_missing(False, "/usr/bin/cc", __file__) == "triton is not installed"
    assert "no C compiler" in cuda_toolchain_missing(True, None, __file__)
    assert "install python3-dev" in cuda_toolchain_missing(True, "/usr/bin/cc", "/nowhere/Python.h")


def test_selective_ac_saves_every_attention_kernel_and_matmul():
    from torch._higher_order_ops.flex_attention import flex_attention
    from torch.utils.checkpoint import CheckpointPolicy

    from lingua.distributed.parallelize import _sac_policy

    policy = _sac_policy()
    for op in (torch.ops.aten.mm.default, torch.ops.aten._scaled_dot_product_cudnn_attention.default,
               torch.ops.aten._scaled_dot_product_flash_attention.default, flex_attention):
        assert policy(None, op) == CheckpointPolicy.MUST_SAVE, op
    assert policy(None, torch.ops.aten.add.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


def test_fsdp_bf16_keeps_the_rope_angles_fp32(tmp_path):
    """FSDP2's mixed precision casts a block's float inputs to param_dtype unless told not to: the blocks must see
    the hidden state in bf16 and the RoPE cos/sin in fp32 (one process, a real gloo group and FSDP)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lingua.distributed.mesh import DistributedArgs
    from lingua.distributed.parallelize import apply_data_parallel
    from lingua.models.decoder import materialize

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1, 1, 1, 1), mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"))
        with torch.device("meta"):
            model = Transformer(TransformerArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seqlen=16))
        apply_data_parallel(model, mesh, DistributedArgs(), torch.bfloat16)
        model = materialize(model, torch.device("cpu"), seed=0)
        seen = []
        model.layers[0].register_forward_pre_hook(lambda m, args: seen.append([a.dtype for a in args[:3]]))
        tokens = torch.randint(0, 64, (2, 16))
        model(tokens, tokens).backward()
        assert seen == [[torch.bfloat16, torch.float32, torch.float32]]  # x, freq_cos, freq_sin
    finally:
        dist.destroy_process_group()
