"""lingua/train/probe.py: statistics equal a direct computation, nothing at all happens on off steps, records and plots are
written, and under FSDP (2 gloo processes) the sharded statistics equal those of the full tensors.

The 2-process test launches this very module under torchrun (`python -m tests.test_probe worker OUT_DIR`)."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from lingua.errors import ConfigError
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.tools.plot import plot_probes, read_probe
from lingua.train.probe import Probe, ProbeArgs, check_probe_args

ARGS = dict(dim=32, n_layers=2, n_heads=4, vocab_size=259, max_seqlen=32, mask="block_causal")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_model(**kw):
    return Transformer.build(TransformerArgs(**{**ARGS, **kw}))


def batch(seed=0, bs=2, seqlen=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS["vocab_size"], (bs, seqlen + 1), generator=g)
    tok_idx = torch.arange(seqlen).repeat(bs, 1)
    tok_idx[:, 9:] -= 9  # a second document starts at 9
    return tokens[:, :-1], tokens[:, 1:], tok_idx


def direct(x: torch.Tensor, k=6.0) -> dict:
    """The definitions of lingua/train/probe.py, computed the obvious way in fp64."""
    x = x.detach().double().flatten()
    mean, std = x.mean(), x.std(correction=0)
    return {"numel": x.numel(), "mean": mean.item(), "std": std.item(), "max_abs": x.abs().max().item(),
            "outlier_share": ((x - mean).abs() > k * std).double().mean().item()}


def assert_close(rec: dict, want: dict, what: str, rtol=1e-5):
    assert rec["numel"] == want["numel"], what
    assert rec["outlier_share"] == pytest.approx(want["outlier_share"], abs=1.5 / want["numel"]), what
    for key in ("std", "max_abs"):
        assert rec[key] == pytest.approx(want[key], rel=rtol), (what, key)
    # the mean of a zero-centred tensor is tiny: compare it on the scale of the spread
    assert abs(rec["mean"] - want["mean"]) <= rtol * (want["std"] + abs(want["mean"])), (what, "mean")


def probed_step(model, probe, step, micro_batches=1):
    """One training step as the train loop runs it, with the probe's two calls; returns the block outputs seen."""
    seen = {f"layers.{i}": [] for i in range(len(model.layers))}
    handles = [b.register_forward_hook(lambda m, i, o, n=f"layers.{j}": seen[n].append(o.detach().clone()))
               for j, b in enumerate(model.layers)]
    probe.before_step(step, model)
    for m in range(micro_batches):
        x, y, tok_idx = batch(seed=m)
        model(x, y, tok_idx=tok_idx).backward()
    probe.after_backward(step, model)
    for h in handles:
        h.remove()
    return seen


def test_stats_equal_direct_computation(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():  # a heavy-tailed weight, so that outliers exist to be counted
        model.layers[0].feed_forward.w2.weight[0, :5] = 3.0
    probe = Probe(ProbeArgs(steps=[1], outlier_std=6.0), tmp_path, rank=0)
    seen = probed_step(model, probe, 1)
    recs = {(r["kind"], r["layer"]): r for r in read_probe(tmp_path)}
    params = dict(model.named_parameters())
    assert {l for k, l in recs if k == "weight"} == set(params)
    assert {l for k, l in recs if k == "grad"} == set(params)
    assert {l for k, l in recs if k == "activation"} == {"layers.0", "layers.1"}
    for name, p in params.items():
        assert_close(recs["weight", name], direct(p), f"weight {name}")
        assert_close(recs["grad", name], direct(p.grad), f"grad {name}")
    for name, outs in seen.items():
        assert_close(recs["activation", name], direct(outs[0]), f"activation {name}")
    assert recs["weight", "layers.0.feed_forward.w2.weight"]["outlier_share"] == pytest.approx(5 / params["layers.0.feed_forward.w2.weight"].numel())
    timing = recs["probe", "all"]
    assert timing["total_ms"] > 0 and timing["hook_ms"] > 0
    assert probe.last_overhead_ms > 0


def test_micro_batches_pool_activation_moments(tmp_path):
    model = tiny_model()
    probe = Probe(ProbeArgs(steps=[1], kinds=["activation"]), tmp_path)
    seen = probed_step(model, probe, 1, micro_batches=2)
    recs = {r["layer"]: r for r in read_probe(tmp_path) if r["kind"] == "activation"}
    for name, outs in seen.items():
        pooled = direct(torch.cat([o.flatten() for o in outs]))
        for key in ("numel", "max_abs"):
            assert recs[name][key] == pytest.approx(pooled[key]), key
        assert recs[name]["std"] == pytest.approx(pooled["std"], rel=1e-5)
        # outliers: each micro-batch against its own mean and std, counts summed
        n_out = sum(direct(o)["outlier_share"] * o.numel() for o in outs)
        assert recs[name]["outlier_share"] == pytest.approx(n_out / pooled["numel"])
    assert not any(r["kind"] in ("weight", "grad") for r in read_probe(tmp_path))  # kinds=[activation]


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


class Untouchable:
    """A 'model' that fails on any use: what the probe receives on steps where it is off."""

    def __getattr__(self, name):
        raise AssertionError(f"the probe touched the model ({name}) on an off step")


def test_off_steps_register_nothing_and_do_nothing(tmp_path):
    model = tiny_model()
    probe = Probe(ProbeArgs(every=3, steps=[5]), tmp_path)
    assert [s for s in range(1, 10) if probe.is_probe_step(s)] == [3, 5, 6, 9]
    for step in (1, 2, 4, 7):
        probe.before_step(step, Untouchable())
        probe.after_backward(step, Untouchable())
        probe.before_step(step, model)
        assert no_hooks(model)
        probe.after_backward(step, model)
    assert not (tmp_path / "probe").exists()  # nothing written either
    probe.before_step(3, model)
    assert all(len(b._forward_hooks) == 1 for b in model.layers)
    x, y, tok_idx = batch()
    model(x, y, tok_idx=tok_idx).backward()
    probe.after_backward(3, model)
    assert no_hooks(model)  # removed after the probed step
    assert {r["step"] for r in read_probe(tmp_path)} == {3}
    off = Probe(ProbeArgs(), tmp_path / "off")  # the default: off
    assert not off.enabled and not any(off.is_probe_step(s) for s in range(1, 1000))


def test_records_file_one_line_per_step_layer_kind(tmp_path):
    model = tiny_model()
    probe = Probe(ProbeArgs(every=1), tmp_path, rank=0)
    for step in (1, 2):
        probed_step(model, probe, step)
    path = tmp_path / "probe" / "probe_rank0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [(r["step"], r["layer"], r["kind"]) for r in rows]
    assert len(keys) == len(set(keys))
    n_params = len(list(model.parameters()))
    assert len(rows) == 2 * (2 + 2 * n_params + 1)  # activations, weights, grads, the probe's own timing
    for r in rows:
        if r["kind"] != "probe":
            assert set(r) == {"step", "layer", "kind", "numel", "mean", "std", "max_abs", "outlier_share", "rank"}
    probed_step(model, probe, 2)  # a resumed run probing step 2 again: the last write wins
    assert len(read_probe(tmp_path)) == len(rows)


def test_bad_args_are_one_line_errors():
    for kw, msg in ((dict(every=-1), "probe.every"), (dict(steps=[0]), "1-based"),
                    (dict(outlier_std=0), "outlier_std"), (dict(kinds=["acts"]), "unknown kind 'acts'")):
        with pytest.raises(ConfigError, match=msg):
            check_probe_args(ProbeArgs(**kw))


def test_plot_writes_non_blank_pngs(tmp_path):
    from matplotlib import image

    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = Probe(ProbeArgs(every=2), tmp_path)
    for step in range(1, 9):
        probed_step(model, probe, step)
        opt.step()
        opt.zero_grad()
    written = plot_probes([tmp_path], tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["probe_activation.png", "probe_grad.png", "probe_overhead.png", "probe_weight.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert image.imread(p)[..., :3].var() > 1e-3, p.name
    assert plot_probes([tmp_path / "plots"], tmp_path / "none") == []  # a run without records: nothing drawn


def test_overhead_is_measured(tmp_path):
    """Step time of a tiny model with the probe off (the calls, no work) and on at every step, printed for the report;
    the probe's own record of its cost is there."""
    model = tiny_model(dim=64)
    x, y, tok_idx = batch(bs=4, seqlen=32)

    def steps(probe, n=10):
        t0 = time.perf_counter()
        for s in range(1, n + 1):
            probe.before_step(s, model)
            model(x, y, tok_idx=tok_idx).backward()
            probe.after_backward(s, model)
            model.zero_grad()
        return (time.perf_counter() - t0) / n

    steps(Probe(ProbeArgs(), tmp_path / "warm"), 3)
    off = min(steps(Probe(ProbeArgs(), tmp_path / "off")) for _ in range(3))
    on = min(steps(Probe(ProbeArgs(every=1), tmp_path / "on")) for _ in range(3))
    timing = [r for r in read_probe(tmp_path / "on") if r["kind"] == "probe"]
    assert timing and all(r["total_ms"] > 0 for r in timing)
    print(f"\nstep {1000 * off:.2f} ms with the probe off, {1000 * on:.2f} ms probed "
          f"(probe's own record: {sum(r['total_ms'] for r in timing) / len(timing):.2f} ms per probed step)")


# ---------------------------------------------------------------- FSDP: sharded statistics equal full-tensor ones


def _worker(out_dir: str) -> None:
    """Under torchrun: the tiny model, FSDP2-sharded over 2 ranks (uneven: 259 embedding rows) and, separately,
    replicated (no_shard); the same batch on both ranks, so the averaged gradients equal the 1-process ones."""
    from lingua.distributed.mesh import DistributedArgs, init_distributed
    from lingua.distributed.parallelize import parallelize_decoder
    from lingua.models.transformer.model import Transformer

    for fsdp_type in ("full_shard", "no_shard"):
        dargs = DistributedArgs(device="cpu", fsdp_type=fsdp_type, dp_shard=2 if fsdp_type == "full_shard" else 1)
        state = init_distributed(dargs)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Transformer(TransformerArgs(**ARGS))
        model = parallelize_decoder(model, state.mesh, dargs)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        probe = Probe(ProbeArgs(steps=[1], kinds=["weight", "grad"]), Path(out_dir) / fsdp_type, state.rank)
        probed_step(model, probe, 1)
    state.close()


@pytest.mark.slow
def test_fsdp_sharded_stats_equal_full_tensor_stats(tmp_path):
    from tests.dist_helpers import torchrun

    torchrun(2, ["worker", str(tmp_path)], module="tests.test_probe", timeout=300)
    torch.manual_seed(0)
    model = tiny_model()
    torch.manual_seed(0)
    model.init_weights()
    x, y, tok_idx = batch(seed=0)
    model(x, y, tok_idx=tok_idx).backward()
    params = dict(model.named_parameters())
    for fsdp_type in ("full_shard", "no_shard"):
        recs = {(r["kind"], r["layer"]): r for r in read_probe(tmp_path / fsdp_type)}
        assert read_probe(tmp_path / fsdp_type, rank=1) == [r for r in read_probe(tmp_path / fsdp_type, rank=1)
                                                            if r["kind"] == "probe"]  # weights/grads: rank 0 only
        assert {l for k, l in recs if k == "weight"} == set(params)
        for name, p in params.items():
            assert_close(recs["weight", name], direct(p), f"{fsdp_type} weight {name}")
            assert_close(recs["grad", name], direct(p.grad), f"{fsdp_type} grad {name}", rtol=1e-4)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])


def test_activation_checkpointing_recompute_is_not_counted_twice(tmp_path):
    from lingua.distributed.parallelize import apply_ac

    model = tiny_model()
    apply_ac(model, selective=False)
    probe = Probe(ProbeArgs(steps=[1]), tmp_path)
    seen = probed_step(model, probe, 1)
    recs = {(r["kind"], r["layer"]): r for r in read_probe(tmp_path)}
    for name, outs in seen.items():
        assert len(outs) == 1  # the wrapper's forward ran once; backward recomputes the inner block only
        assert_close(recs["activation", name], direct(outs[0]), name)
    assert "layers.0.attention.wq.weight" in {l for k, l in recs if k == "weight"}  # wrapper names cleaned
