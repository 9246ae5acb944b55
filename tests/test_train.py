"""The shared train loop end to end on a tiny model: learning, exact resume, atomic saves, preemption, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lingua.args import load_config
from lingua.checkpoint.manager import list_checkpoints
from lingua.errors import LinguaError
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, TrainState, train
from tests.conftest import (
    ROOT,
    assert_bits_per_byte,
    assert_same_weights,
    final_weights,
    losses,
    read_jsonl,
    tiny_overrides,
)


def run(corpus, dump_dir, **extra):
    return train(load_config(TrainArgs, tiny_overrides(corpus, dump_dir, **extra)), TRANSFORMER_SPEC)






def test_loss_decreases_and_metrics_are_logged(tiny_corpus, tmp_path):
    extra = dict(steps=40, checkpoint__dump__every=0, optim__lr=1e-2)
    result = run(tiny_corpus, tmp_path, **extra)
    assert result["status"] == "done" and result["step"] == 40
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("step", "tokens_seen", "loss", "lr", "grad_norm", "tok_per_s", "mfu", "step_ms", "data_ms", "mem_gb"):
        assert key in rows[0], key
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first - 1.0, (first, last)  # bytes start at ln(258) = 5.55 nats
    assert rows[-1]["tokens_seen"] == 40 * 4 * 32
    evals = read_jsonl(tmp_path / "metrics.eval.jsonl")
    assert evals[-1]["step"] == 40
    assert_bits_per_byte(evals[-1], tiny_corpus, "alpha", max_docs=4)
    # the run's config.yaml is the config it ran with: loaded back, the same TrainArgs as the overrides give
    given = load_config(TrainArgs, tiny_overrides(tiny_corpus, tmp_path, **extra))
    assert load_config(TrainArgs, [f"config={tmp_path / 'config.yaml'}"]) == given
    # the last step always leaves a checkpoint, even with dump.every=0
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["0000000040"]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_resume_is_bit_identical(tiny_corpus, tmp_path, compiled, request):
    """Also with the default compile (the whole model, the fused loss inside its graph): a resumed process compiles
    the same graph again and continues bit for bit. Compiled on one thread: inductor's multi-threaded CPU
    reductions combine partial sums in a thread-timing order, so two fresh compiled runs on 2 threads already
    differ in the last bit (measured; eager kernels do not)."""
    if compiled:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = {"distributed__compile": compiled}
    run(tiny_corpus, full, **extra)
    run(tiny_corpus, cut, **extra)
    # "Interrupt" after step 4: drop the final checkpoint and the logs past step 4, then run the same command.
    shutil.rmtree(cut / "checkpoints" / "0000000008")
    rows = [r for r in read_jsonl(cut / "metrics.jsonl") if r["step"] <= 4]
    (cut / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    run(tiny_corpus, cut, **extra)
    a, b = losses(full), losses(cut)
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    wa, wb = final_weights(full), final_weights(cut)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_async_loader_resume_is_bit_identical(tiny_corpus, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(tiny_corpus, full, data__load_async=True, steps=6, checkpoint__dump__every=3)
    run(tiny_corpus, cut, data__load_async=True, steps=6, checkpoint__dump__every=3)
    shutil.rmtree(cut / "checkpoints" / "0000000006")
    run(tiny_corpus, cut, data__load_async=True, steps=6, checkpoint__dump__every=3)
    assert losses(full) == losses(cut)
    assert_same_weights(final_weights(full), final_weights(cut))


class _NoData:
    """The data loader's share of the train state, which tests/test_data.py covers."""

    def state_dict(self):
        return {}

    def load_state_dicts(self, states):
        pass


def _train_state() -> TrainState:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return TrainState(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)), _NoData())


def test_train_state_restores_the_rng_and_the_schedule():
    """The tiny runs draw no random numbers after a resume (no dropout), so the resume tests above cannot see a lost
    RNG state; a model that does draw would diverge after resuming."""
    saved = _train_state()
    for _ in range(3):
        saved.scheduler.optimizer.step()  # no gradients: only keeps LambdaLR's order check quiet
        saved.scheduler.step()
    torch.manual_seed(7)
    state = saved.state_dict(world_size=1)
    want = torch.rand(4)
    torch.manual_seed(0)
    resumed = _train_state()
    resumed.load_state_dicts([state], rank=0, world_size=1)
    assert torch.equal(torch.rand(4), want)
    assert resumed.scheduler.last_epoch == 3 and resumed.scheduler.optimizer.param_groups[0]["lr"] == 0.25


def test_grad_accumulation_matches_one_big_batch(tiny_corpus, tmp_path):
    # The global batch (batch_size x grad_acc_steps) fixes the data order: both runs see the same 4 sequences per
    # step, in one batch or split in two micro-batches.
    run(tiny_corpus, tmp_path / "big", steps=3, data__batch_size=4, optim__warmup=0)
    run(tiny_corpus, tmp_path / "acc", steps=3, data__batch_size=2, grad_acc_steps=2, optim__warmup=0)
    # Equal up to fp32 summation order, step by step: the loss and the gradient norm before clipping (Adam and
    # clipping would hide a gradient k times too large in the loss alone; the norm shows it at once).
    for b, a in zip(read_jsonl(tmp_path / "big" / "metrics.jsonl"), read_jsonl(tmp_path / "acc" / "metrics.jsonl"),
                    strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-5), (a, b)


def test_interrupted_save_is_never_resumed_from(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, steps=4)
    ckpts = tmp_path / "checkpoints"
    # A save killed mid-way leaves a .tmp dir; a dir without COMPLETE is not a checkpoint either.
    shutil.copytree(ckpts / "0000000004", ckpts / "0000000006.tmp")
    shutil.copytree(ckpts / "0000000004", ckpts / "0000000007")
    (ckpts / "0000000007" / "COMPLETE").unlink()
    assert [p.name for p in list_checkpoints(ckpts)] == ["0000000004"]
    result = run(tiny_corpus, tmp_path, steps=8)
    assert result["step"] == 8
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # resumed from 4, not from the broken 6 or 7
    # the leftovers of the broken saves are cleared when the run starts
    assert not (ckpts / "0000000006.tmp").exists() and not (ckpts / "0000000007").exists()


def test_keep_n_most_recent(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, steps=8, checkpoint__dump__every=2, checkpoint__dump__keep=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["0000000006", "0000000008"]


def test_init_ckpt_path_loads_weights_only(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path / "a", steps=4)
    src = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    run(tiny_corpus, tmp_path / "b", steps=1, checkpoint__init_ckpt_path=str(src), optim__lr=0.0)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert read_jsonl(tmp_path / "b" / "metrics.jsonl")[0]["step"] == 1  # a fresh run, not a resume


def test_save_at_end_false_keeps_only_the_periodic_saves(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path / "a", steps=5, checkpoint__dump__every=2, checkpoint__save_at_end=False)
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == ["0000000002", "0000000004"]
    run(tiny_corpus, tmp_path / "b", steps=5, checkpoint__dump__every=2)  # the default: step 5 saved too
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")][-1] == "0000000005"


@pytest.mark.parametrize("freq, every, at", [(1, 0, r"\d+"), (100, 25, "25")], ids=["log_every_step", "rare_logs"])
def test_non_finite_loss_stops_without_checkpoint(tiny_corpus, tmp_path, freq, every, at):
    """The loss is read only at logging and save steps (no host sync elsewhere): with logs every 100 steps, the
    first save step (25) is where the NaN is seen, before that save."""
    with pytest.raises(LinguaError, match=rf"loss is (nan|inf) at step {at}: stopping without saving"):
        run(tiny_corpus, tmp_path, steps=50, optim__lr=1e9, optim__clip=0.0, optim__warmup=0,
            checkpoint__dump__every=every, logging__freq=freq)
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_profiler_writes_a_chrome_trace_and_where_the_time_went(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, steps=5, profiling__run=True, profiling__profile_warmup=1, profiling__profile_steps=2)
    traces = list((tmp_path / "profiling").glob("trace_*.json"))
    assert traces and traces[0].stat().st_size > 1000
    shares = json.loads((tmp_path / "profiling" / "time_breakdown_rank00000.json").read_text())
    assert set(shares) == {"attention", "matmul", "optimizer", "compiled kernels", "other"}
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert shares["matmul"] > 0.05 and shares["attention"] > 0 and shares["optimizer"] > 0  # a real step's ops


def test_time_breakdown_sorts_ops_into_their_categories():
    from torch.autograd import DeviceType

    from lingua.train.profiling import time_breakdown

    class Event:
        def __init__(self, key, t, device_type=DeviceType.CPU):
            self.key, self.self_cpu_time_total, self.self_device_time_total = key, t, 2 * t
            self.device_type = device_type

    events = [Event("aten::mm", 50), Event("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 30),
              Event("## Call CompiledFxGraph fabc ##", 10), Event("aten::_fused_adamw_", 5), Event("aten::add_", 5)]
    assert time_breakdown(events) == {"attention": 0.3, "matmul": 0.5, "optimizer": 0.05, "compiled kernels": 0.1,
                                      "other": 0.05}
    # CUDA: the kernels' device time only (aten::mm's own device time repeats its gemm kernel's)
    kernels = [Event("sm90_xmma_gemm_bf16bf16_bf16f32", 30, DeviceType.CUDA),
               Event("pytorch_flash::flash_bwd_kernel", 10, DeviceType.CUDA),
               Event("triton_poi_fused_add_mul_0", 10, DeviceType.CUDA)]
    assert time_breakdown(events + kernels, device_time=True) == {
        "attention": 0.2, "matmul": 0.6, "optimizer": 0.0, "compiled kernels": 0.2, "other": 0.0}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"data__seq_len": 128}, "data.seq_len=128 is above model.max_seqlen=64"),
        ({"model__vocab_size": 100}, "has 258 tokens, more than model.vocab_size=100"),
        ({"data__root_dir": "/nonexistent/data"}, "/nonexistent/data"),
        ({"data__tokenizer__name": "sp", "data__tokenizer__path": "/nonexistent/tok.model"}, "/nonexistent/tok.model"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_corpus, tmp_path, extra, message):
    with pytest.raises(LinguaError) as e:
        run(tiny_corpus, tmp_path, **extra)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_dump_dir_that_is_a_file(tiny_corpus, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LinguaError, match="dump_dir '.*file' exists and is not a directory"):
        run(tiny_corpus, f)


def test_checkpoint_from_another_model_names_the_parameter(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, steps=2, checkpoint__dump__every=2)
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(LinguaError, match=r"another model: '.*' has shape"):
        run(tiny_corpus, tmp_path, steps=4, model__dim=48)
    assert (tmp_path / "config.yaml").read_text() == config  # still the config that trained, not the rejected one


def test_corrupt_checkpoint_is_a_clear_error(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, steps=2, checkpoint__dump__every=2)
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    for f in ckpt.glob("*.distcp"):
        f.write_bytes(b"garbage")
    with pytest.raises(LinguaError, match=r"corrupt checkpoint: .*\.distcp does not match"):
        run(tiny_corpus, tmp_path, steps=4)
    (ckpt / "COMPLETE").write_text("2\n")  # without checksums (an old checkpoint), DCP's failure is still one line
    with pytest.raises(LinguaError, match="cannot load checkpoint"):
        run(tiny_corpus, tmp_path, steps=4)


@pytest.mark.parametrize("name, low, high", [("llama_1B", 1.0e9, 2.0e9), ("llama_7B", 6.0e9, 8.0e9)])
def test_cluster_configs_build_on_meta(name, low, high):
    from lingua.models.decoder import num_params
    from lingua.models.transformer.model import Transformer

    cfg = load_config(TrainArgs, [f"config={ROOT}/apps/main/configs/{name}.yaml"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert low < num_params(model) < high


# ---------------------------------------------------------------- real processes: signals and kill -9


def _cli(corpus, dump_dir, **extra):
    return [sys.executable, "-m", "apps.main.train"] + tiny_overrides(corpus, dump_dir, **extra)


def _wait_for(pred, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


# One uninterrupted reference for the three interrupted runs below: checkpoint saves and the loader's thread or
# process change no number (test_async_loader_resume_is_bit_identical and the resumes here check that), so every
# interrupted run must end with this run's loss at step 400, bit for bit.
PREEMPT_STEPS = dict(steps=400, optim__warmup=0)


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
    ref = tmp_path_factory.mktemp("uninterrupted") / "ref"
    subprocess.run(_cli(tiny_corpus, ref, checkpoint__dump__every=0, **PREEMPT_STEPS), check=True, capture_output=True,
                   cwd=ROOT, timeout=600)
    return losses(ref)[400]


@pytest.mark.slow
@pytest.mark.parametrize("sig, load_async", [(signal.SIGUSR2, False), (signal.SIGTERM, True)])
def test_preemption_signal_checkpoints_and_resumes_exactly(tiny_corpus, tmp_path, uninterrupted, sig, load_async):
    # with the async loader the exit must also stop its child process without hanging (communicate's timeout)
    steps = dict(checkpoint__dump__every=0, data__load_async=load_async, **PREEMPT_STEPS)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(tiny_corpus, run_dir, **steps), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_jsonl(run_dir / "metrics.jsonl")) >= 5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and 5 <= int(saved[0].name) < 400, out
    subprocess.run(_cli(tiny_corpus, run_dir, **steps), check=True, capture_output=True, cwd=ROOT, timeout=600)
    assert losses(run_dir)[400] == uninterrupted


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_from_last_complete(tiny_corpus, tmp_path, uninterrupted):
    steps = dict(checkpoint__dump__every=20, **PREEMPT_STEPS)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(tiny_corpus, run_dir, **steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: len(list_checkpoints(run_dir / "checkpoints")) >= 2)
    proc.kill()
    proc.wait()
    subprocess.run(_cli(tiny_corpus, run_dir, **steps), check=True, capture_output=True, cwd=ROOT, timeout=600)
    assert losses(run_dir)[400] == uninterrupted


def test_probe_runs_inside_the_train_loop(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, steps=4, probe__every=2)
    rows = [r for f in sorted((tmp_path / "probe").glob("*.jsonl")) for r in read_jsonl(f)]
    assert sorted({r["step"] for r in rows}) == [2, 4]
    kinds = {r["kind"] for r in rows}
    assert {"activation", "weight", "grad"} <= kinds
    acts = [r for r in rows if r["kind"] == "activation" and r["step"] == 2]
    assert sorted(r["layer"] for r in acts) == ["layers.0", "layers.1"]
    assert all(r["std"] > 0 and r["max_abs"] > 0 for r in acts)
    # the plotting tool draws the probe records of a real run next to its curves
    from lingua.tools.plot import main as plot_main

    assert plot_main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"loss_step.png", "probe_activation.png", "probe_grad.png"} <= pngs, pngs
    assert all((tmp_path / "plots" / n).stat().st_size > 5000 for n in pngs)


def test_rerunning_a_finished_run_does_nothing(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, steps=4)
    before = (tmp_path / "metrics.eval.jsonl").read_text()
    result = run(tiny_corpus, tmp_path, steps=4)
    assert result["step"] == 4 and result["status"] == "done"
    assert (tmp_path / "metrics.eval.jsonl").read_text() == before  # no second evaluation
