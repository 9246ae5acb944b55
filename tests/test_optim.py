import math

import pytest
import torch
from torch import nn

from lingua.errors import ConfigError
from lingua.train.optim import (
    OptimArgs,
    build_optimizer,
    clip_grad_norm_,
    fused_supported,
    lr_factor,
)

# ---------------------------------------------------------------------------------------------------------
# Schedules against their closed forms
# ---------------------------------------------------------------------------------------------------------


def f(step, n_steps=100, **kw):
    return lr_factor(step, OptimArgs(**kw), n_steps)


def test_constant():
    assert [f(s, scheduler="constant") for s in (0, 1, 50, 100, 1000)] == [1.0] * 5


def test_linear_closed_form():
    kw = dict(scheduler="linear", warmup=10, lr_min_ratio=0.1)
    assert f(0, **kw) == 0.0
    assert f(5, **kw) == pytest.approx(0.5)
    assert f(9, **kw) == pytest.approx(0.9)
    assert f(10, **kw) == pytest.approx(1.0)  # end of warmup = peak
    assert f(55, **kw) == pytest.approx(1 - 0.5 * 0.9)  # halfway: 1 - s (1 - min)
    assert f(100, **kw) == pytest.approx(0.1)
    assert f(250, **kw) == pytest.approx(0.1)  # floor after the run


def test_inv_sqrt_closed_form():
    kw = dict(scheduler="inv_sqrt", warmup=100, exp_factor=0.5, lr_min_ratio=0.1)
    assert f(50, **kw) == pytest.approx(0.5)
    assert f(100, **kw) == pytest.approx(1.0)
    assert f(400, **kw) == pytest.approx(0.5)  # sqrt(100 / 400)
    assert f(2500, **kw) == pytest.approx(0.2)
    assert f(40000, **kw) == pytest.approx(0.1)  # 0.05 floored at lr_min_ratio
    assert f(400, **{**kw, "exp_factor": 1.0}) == pytest.approx(0.25)


def test_cosine_closed_form():
    kw = dict(scheduler="cosine", warmup=10, lr_min_ratio=0.1)
    n = 110

    def closed(step, theta=1.0):
        s = (step - 10) / 100
        return 0.1 + 0.45 * (math.cos(math.pi * s**theta) + 1)

    assert f(0, n, **kw) == 0.0
    assert f(5, n, **kw) == pytest.approx(0.5)
    assert f(10, n, **kw) == pytest.approx(1.0)
    for step in (35, 60, 85, 109):
        assert f(step, n, **kw) == pytest.approx(closed(step))
    assert f(60, n, **kw) == pytest.approx(0.55)
    assert f(110, n, **kw) == pytest.approx(0.1)  # the last step is the floor, not the peak
    assert f(500, n, **kw) == pytest.approx(0.1)
    assert f(60, n, **kw, cosine_theta=2.0) == pytest.approx(closed(60, theta=2.0))


def test_wsd_closed_form():
    # 100 steps, warmup 10, decay over the last 20% (steps 80..100): factor 1 / (p / min + (1 - p))
    kw = dict(scheduler="wsd", warmup=10, decay_fraction=0.2, lr_min_ratio=0.1)
    assert f(0, **kw) == 0.0
    assert f(5, **kw) == pytest.approx(0.5)
    assert f(10, **kw) == pytest.approx(1.0)
    assert f(50, **kw) == 1.0  # stable phase
    assert f(80, **kw) == 1.0  # decay phase starts here
    assert f(85, **kw) == pytest.approx(1 / (0.25 / 0.1 + 0.75))
    assert f(90, **kw) == pytest.approx(1 / (0.5 / 0.1 + 0.5))  # middle: 0.1818..
    assert f(99, **kw) == pytest.approx(1 / (0.95 / 0.1 + 0.05))
    assert f(100, **kw) == pytest.approx(0.1)  # end of decay = lr_min_ratio
    decay = [f(s, **kw) for s in range(80, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing through the decay


@pytest.mark.parametrize("name", ["linear", "inv_sqrt", "cosine", "wsd"])
def test_floor_and_warmup_start(name):
    kw = dict(scheduler=name, warmup=10, lr_min_ratio=0.2, decay_fraction=0.1)
    values = [f(s, **kw) for s in range(10, 300)]
    assert min(values) >= 0.2 - 1e-12
    assert max(values) <= 1.0 + 1e-12
    assert f(0, **kw) == 0.0


def test_lambda_lr_follows_schedule():
    model = nn.Linear(4, 4)
    args = OptimArgs(lr=1e-3, scheduler="wsd", warmup=5, decay_fraction=0.2)
    opt, sched = build_optimizer(model, args, n_steps=50)
    for step in range(51):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(step, args, 50))
        opt.step()
        sched.step()


def test_bad_scheduler_names_the_key():
    with pytest.raises(ConfigError, match=r"optim\.scheduler.*'cosinus'"):
        build_optimizer(nn.Linear(2, 2), OptimArgs(scheduler="cosinus"), n_steps=10)
    with pytest.raises(ConfigError, match=r"optim\.scheduler"):
        lr_factor(3, OptimArgs(scheduler="nope"), 10)
    with pytest.raises(ConfigError, match=r"optim\.decay_fraction"):
        build_optimizer(nn.Linear(2, 2), OptimArgs(scheduler="wsd", decay_fraction=1.0), n_steps=10)


# ---------------------------------------------------------------------------------------------------------
# AdamW: fused when supported, same update as the unfused one
# ---------------------------------------------------------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def test_fused_chosen_when_supported():
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    model = _mlp()
    opt, _ = build_optimizer(model, OptimArgs(), n_steps=10)
    expected = "cpu" in _get_fused_kernels_supported_devices()
    assert fused_supported(model.parameters()) == expected
    assert bool(opt.param_groups[0]["fused"]) == expected
    assert expected, "torch >= 2.4 has a fused AdamW on CPU"
    opt, _ = build_optimizer(model, OptimArgs(fused=False), n_steps=10)
    assert not opt.param_groups[0]["fused"]


def test_fused_matches_unfused():
    args = OptimArgs(lr=1e-2, warmup=0, scheduler="constant")
    models = [_mlp(), _mlp()]
    opts = [build_optimizer(models[0], args, 10)[0], build_optimizer(models[1], OptimArgs(**{**vars(args), "fused": False}), 10)[0]]
    assert opts[0].param_groups[0]["fused"] and not opts[1].param_groups[0]["fused"]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 16, generator=g)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(models[0][0].weight, _mlp()[0].weight)  # they did move


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches with loss / k then one step == one step on the whole batch
# ---------------------------------------------------------------------------------------------------------


def _train(batches_per_step, scale_loss=True, steps=3):
    """fp32; each optimizer step sees the same 32 examples, split into `batches_per_step` micro-batches.
    Returns the model and the accumulated gradients seen by each step (before clipping)."""
    model = _mlp()
    opt, sched = build_optimizer(model, OptimArgs(lr=1e-2, warmup=0, scheduler="constant", clip=1.0), n_steps=steps)
    g = torch.Generator().manual_seed(2)
    grads = []
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)
        for xm, ym in zip(x.chunk(batches_per_step), y.chunk(batches_per_step)):
            loss = nn.functional.mse_loss(model(xm), ym)
            (loss / batches_per_step if scale_loss else loss).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        clip_grad_norm_(model, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, grads


def test_grad_accumulation_matches_big_batch():
    """Tolerance: fp32, grads atol=1e-7 / rtol=1e-5, weights after 3 AdamW steps (with clipping) atol=1e-6 /
    rtol=1e-5; the differences come only from summation order."""
    big, big_grads = _train(1)
    for k in (2, 4):
        acc, acc_grads = _train(k)
        for step_a, step_b in zip(big_grads, acc_grads):
            for a, b in zip(step_a, step_b):
                torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
        for a, b in zip(big.parameters(), acc.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(big[0].weight, _mlp()[0].weight)
    # the check can fail: without the 1/k scale the accumulated gradients are k times too large. (The weights
    # alone would not show it: Adam's update is nearly invariant to the gradient's scale.)
    _, wrong_grads = _train(4, scale_loss=False)
    torch.testing.assert_close(wrong_grads[0][0], 4 * big_grads[0][0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------


def _with_grads(seed=3):
    model = _mlp(seed)
    model(torch.randn(4, 16)).sum().backward()
    return model


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_matches_torch(max_norm):
    ours, ref = _with_grads(), _with_grads()
    n = clip_grad_norm_(ours, max_norm)
    n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    assert n.item() == pytest.approx(n_ref.item(), rel=1e-6)
    assert n.item() > 0.5  # the small max_norm really clips
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    total = torch.cat([p.grad.flatten() for p in ours.parameters()]).norm().item()
    assert total == pytest.approx(min(max_norm, n.item()), rel=1e-4)


def test_clip_dtensor_mixed_meshes(tmp_path):
    """DTensor grads on two meshes plus a plain tensor grad (one process, gloo): the norm of all of them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        g = torch.Generator().manual_seed(4)
        grads = [torch.randn(8, 4, generator=g), torch.randn(5, generator=g), torch.randn(3, 3, generator=g)]
        expected = torch.cat([x.flatten() for x in grads]).norm().item()
        p1 = nn.Parameter(distribute_tensor(torch.zeros(8, 4), mesh["dp"], [Shard(0)]))
        p1.grad = distribute_tensor(grads[0].clone(), mesh["dp"], [Shard(0)])
        p2 = nn.Parameter(distribute_tensor(torch.zeros(5), mesh["tp"], [Replicate()]))
        p2.grad = distribute_tensor(grads[1].clone(), mesh["tp"], [Replicate()])
        p3 = nn.Parameter(torch.zeros(3, 3))
        p3.grad = grads[2].clone()
        n = clip_grad_norm_([p1, p2, p3], 1.0)
        assert n.item() == pytest.approx(expected, rel=1e-6)
        scale = 1.0 / (expected + 1e-6)
        torch.testing.assert_close(p1.grad.full_tensor(), grads[0] * scale)
        torch.testing.assert_close(p2.grad.full_tensor(), grads[1] * scale)
        torch.testing.assert_close(p3.grad, grads[2] * scale)
    finally:
        dist.destroy_process_group()


def test_cosine_with_short_cycles_restarts_each_cycle_from_the_peak():
    # cycle_length=0.5 over 100 steps: two cycles of 50 steps, each a full cosine from 1 down to lr_min_ratio
    kw = dict(scheduler="cosine", warmup=0, lr_min_ratio=0.1, cycle_length=0.5)
    for start in (0, 50):
        assert f(start, 100, **kw) == pytest.approx(1.0)
        assert f(start + 25, 100, **kw) == pytest.approx(0.55)
        assert f(start + 49, 100, **kw) == pytest.approx(0.1 + 0.45 * (math.cos(math.pi * 0.98) + 1))
    assert f(100, 100, **kw) == pytest.approx(0.1)
