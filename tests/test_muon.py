"""Muon (lingua/train/muon.py) and the optimizer's param groups (lingua/train/optim.py): which params get Muon, weight decay
and the embeddings' lr; Muon's numbers against torch.optim.Muon; training, exact resume and an old AdamW
checkpoint resuming under the new group layout."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from apps.mamba.model import MAMBA_SPEC
from lingua.args import load_config
from lingua.distributed.precision import cpu_bf16_features
from lingua.errors import ConfigError
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, train
from lingua.train.muon import MuonAdamW, assign_owners, orthogonalize, resolve_ns_dtype
from lingua.train.optim import OptimArgs, build_optimizer, param_groups
from tests.conftest import ROOT, cut_at, final_weights, losses, tiny_overrides
from tests.dist_helpers import free_port, torchrun
from tests.test_distributed import BATCH, EVERY, assert_same_curve, curve, dcp_contents
from tests.test_distributed import cfg as dcfg


def tiny(**kw):
    return Transformer.build(TransformerArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32, max_seqlen=16, **kw))


def names_of(model, groups):
    name = {id(p): n for n, p in model.named_parameters()}
    return {g["role"]: (g["muon"], g["lr"], g["weight_decay"], sorted(name[id(p)] for p in g["params"]))
            for g in groups}


def test_param_routing_weight_decay_and_embed_lr():
    model = tiny()
    groups = names_of(model, param_groups(model, OptimArgs(name="muon", lr=1e-3, weight_decay=0.1, embed_lr=5e-3)))
    assert list(groups) == ["matrices", "head", "embeddings", "no_decay"]  # matrices first: its lr is logged
    muon, lr, wd, names = groups["matrices"]
    assert (muon, lr, wd) == (True, 1e-3, 0.1) and len(names) == 2 * 7
    assert all(n.startswith("layers.") and n.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight",
                                                         "w1.weight", "w2.weight", "w3.weight")) for n in names)
    assert groups["head"] == (False, 5e-3, 0.1, ["output.weight"])
    assert groups["embeddings"] == (False, 5e-3, 0.0, ["tok_embeddings.weight"])
    muon, lr, wd, names = groups["no_decay"]
    assert (muon, lr, wd) == (False, 1e-3, 0.0) and all(n.endswith("norm.weight") for n in names) and len(names) == 5
    # AdamW with lingua's rule (decay everything) and no embed_lr: one group, the layout of old checkpoints
    groups = param_groups(model, OptimArgs(name="adamw", decay_params="all"))
    assert len(groups) == 1 and [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]
    # a tied head is the embedding: no decay, one tensor
    tied = tiny(weight_tying=True)
    groups = names_of(tied, param_groups(tied, OptimArgs(name="muon", embed_lr=1e-2)))
    assert "head" not in groups and groups["embeddings"][3] == ["tok_embeddings.weight"]
    # Mamba: the SSM scalars and the conv bias get no decay, the conv weight (2-D, not a Linear) is AdamW's
    with torch.device("meta"):
        mamba = MAMBA_SPEC.build(MAMBA_SPEC.args_cls(dim=32, n_layers=1, vocab_size=32))
    groups = names_of(mamba, param_groups(mamba, OptimArgs(name="muon")))
    assert {"layers.0.mixer.A_log", "layers.0.mixer.dt_bias", "layers.0.mixer.D", "layers.0.mixer.conv_bias",
            "tok_embeddings.weight"} <= set(groups["embeddings+no_decay"][3])  # same lr and decay: one group
    assert groups["head+other"] == (False, 3e-4, 0.1, ["layers.0.mixer.conv_weight", "output.weight"])
    assert groups["matrices"][3] == ["layers.0.mixer.in_proj.weight", "layers.0.mixer.out_proj.weight"]
    with pytest.raises(ConfigError, match="optim.name: unknown value 'sgd'"):
        build_optimizer(model, OptimArgs(name="sgd"), 10)


def test_muon_step_matches_torch_muon_and_adamw_groups_match_adamw():
    """Muon groups: torch.optim.Muon's update (fp32 Newton-Schulz here, torch's is bf16: close, not equal); the
    AdamW groups: exactly torch's AdamW."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16))
    w_ref, b_ref = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    ours = MuonAdamW([{"params": [w], "muon": True, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
                       "adjust_lr": "match_rms_adamw"}, {"params": [b], "muon": False, "weight_decay": 0.0}],
                     lr=1e-2, weight_decay=0.1)
    ref_m = torch.optim.Muon([w_ref], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_a = torch.optim.AdamW([b_ref], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(24, 16), torch.randn(16)
        w.grad, b.grad, w_ref.grad, b_ref.grad = g[0].clone(), g[1].clone(), g[0].clone(), g[1].clone()
        ours.step()
        ref_m.step()
        ref_a.step()
    assert torch.equal(b, b_ref)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=2e-3)  # bf16 vs fp32 iteration
    # the orthogonalized update has singular values near 1 (Newton-Schulz lands them in ~[0.5, 1.5])
    g = torch.randn(24, 16)
    for dtype in ("fp32", "bf16"):
        s = torch.linalg.svdvals(orthogonalize(g, 5, dtype).float())
        assert 0.5 < s.min() and s.max() < 1.5, dtype
    # bf16 iterates to the same update, to bf16's precision (its matmuls are native on CUDA and AVX512-BF16 CPUs)
    torch.testing.assert_close(orthogonalize(g, 5, "bf16"), orthogonalize(g, 5, "fp32"), rtol=0, atol=0.05)
    assert resolve_ns_dtype("auto", torch.device("cpu")) == ("bf16" if cpu_bf16_features() else "fp32")
    assert resolve_ns_dtype("fp32", torch.device("cpu")) == "fp32"
    assert assign_owners([10, 40, 30, 20], 2) == [0, 0, 1, 1]  # largest first, to the least-loaded: 50 each


def run(corpus, dump_dir, **extra):
    return train(load_config(TrainArgs, tiny_overrides(corpus, dump_dir, **extra)), TRANSFORMER_SPEC)


def test_muon_trains_and_resumes_bit_identically(tiny_corpus, tmp_path):
    full = tmp_path / "full"
    run(tiny_corpus, full, optim__name="muon", optim__lr=1e-2, steps=12, eval__at_end=False)
    a = losses(full)
    assert a[12] < a[1] - 1.0, a  # bytes start at ln(258) = 5.55 nats
    cut = cut_at(full, tmp_path / "cut", 8)
    run(tiny_corpus, cut, optim__name="muon", optim__lr=1e-2, steps=12, eval__at_end=False)
    b = losses(cut)
    assert [a[s] for s in range(9, 13)] == [b[s] for s in range(9, 13)]
    wa, wb = final_weights(full), final_weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_old_single_group_adamw_checkpoint_resumes_under_the_split_groups(tiny_corpus, tmp_path):
    """A run saved with one param group (decay_params=all: the old layout) continues under the default groups with
    its AdamW moments loaded: step 5's update of the decayed matrices equals the one-group run's (same moments, same
    lr), while norms and embeddings, no longer decayed, differ."""
    old = tmp_path / "old"
    run(tiny_corpus, old, steps=5, optim__decay_params="all", eval__at_end=False)
    new = cut_at(old, tmp_path / "new", 4)
    run(tiny_corpus, new, steps=5, eval__at_end=False)
    assert losses(new)[5] == losses(old)[5]
    wa, wb = final_weights(old), final_weights(new)
    decayed = [k for k in wa if k.startswith("layers.") and wa[k].ndim == 2] + ["output.weight"]
    assert all(torch.equal(wa[k], wb[k]) for k in decayed)  # moments not loaded would give another update
    assert not torch.equal(wa["norm.weight"], wb["norm.weight"])
    assert not torch.equal(wa["tok_embeddings.weight"], wb["tok_embeddings.weight"])


# ---------------------------------------------------------------- distributed (gloo, real torchrun processes)


@pytest.mark.slow
def test_distributed_orthogonalization_is_exact_and_split_across_ranks():
    """2 ranks, matrices sharded by rows (FSDP), by columns (row-wise TP), uneven and replicated: every result
    equals the single-process Newton-Schulz exactly, and each matrix was orthogonalized by one rank only (the work
    is split). `--nproc_per_node=4` adds a 2x2 (dp, tp) mesh (run by hand: 4 processes cost too much here)."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "tests.muon_dist_check"], cwd=ROOT, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", out.stdout)]  # two ranks' lines may interleave
    assert len(rows) == 2 and all(r["max_err"] == 0.0 for r in rows), rows
    assert sum(r["computed"] for r in rows) == rows[0]["total"] and all(r["computed"] < rows[0]["total"] for r in rows)
    # a sharded matrix goes to its owner and back once: 2 (world-1)/world x its bytes (+ uneven shards' padding),
    # where gathering it on every rank and broadcasting the result sent 2 (world-1) x (2x at 2 ranks, 6x at 4); a
    # replicated one (no_shard) is only sent back, (world-1) x, as the broadcast did
    world, sent, r0 = len(rows), sum(r["sent"] for r in rows), rows[0]
    assert all(r["other_ops"] == [] for r in rows), rows
    bound = 1.2 * (2 * (world - 1) / world * r0["sharded_bytes"] + (world - 1) * r0["replicated_bytes"])
    assert 0 < sent <= bound, (sent, bound)


@pytest.mark.slow
def test_fsdp_muon_matches_one_process_and_resumes_resharded_on_one(tiny_corpus, tmp_path):
    """2-process FSDP Muon follows the 1-process Muon curve (the tolerance of tests/test_distributed.py); its DCP
    checkpoint holds the momentum buffers; resumed on 2 processes it repeats the run exactly, and on one process it
    continues the 1-process curve."""
    # fp32 Newton-Schulz: bf16's rounding would differ between the layouts' thread counts
    muon = dict(optim__name="muon", optim__muon_ns_dtype="fp32", model__weight_tying=True, eval__at_end=False)
    ref, fsdp = tmp_path / "ref", tmp_path / "fsdp"
    train(load_config(TrainArgs, dcfg(tiny_corpus, ref, data__batch_size=BATCH, **muon)), TRANSFORMER_SPEC)
    torchrun(2, dcfg(tiny_corpus, fsdp, data__batch_size=BATCH // 2, distributed__dp_shard=2, **muon),
             ["--global-batch"])
    assert_same_curve(curve(ref), curve(fsdp))
    ckpt = fsdp / "checkpoints" / f"{EVERY:010d}"
    saved = dcp_contents(ckpt, tmp_path)
    assert sum(k.endswith("momentum_buffer") for k in saved) == 14  # Muon's state (2 layers x 7 matrices) is saved
    same = cut_at(fsdp, tmp_path / "to2", EVERY)  # resumed on 2 processes: bit-identical
    torchrun(2, dcfg(tiny_corpus, same, data__batch_size=BATCH // 2, distributed__dp_shard=2, **muon),
             ["--global-batch"])
    assert losses(same) == losses(fsdp)
    cut = cut_at(fsdp, tmp_path / "to1", EVERY)
    train(load_config(TrainArgs, dcfg(tiny_corpus, cut, data__batch_size=BATCH, **muon)), TRANSFORMER_SPEC)
    assert_same_curve(curve(ref), curve(cut))  # a momentum lost or misplaced in the reshard leaves this curve
