"""apps/moe: the routed mixture-of-experts decoder. The MoE layer equals a token-by-token reference (grouped matmuls
and the loop alike, softmax and sigmoid gates, shared expert, selection bias); training through the shared loop adds
the aux and z losses, logs the expert load (no dropped tokens), updates the balancing bias, resumes bit-identically,
evaluates and generates through apps/main's entry points."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from apps.main.eval import EvalAppArgs
from apps.main.eval import main as eval_main
from apps.moe.model import (
    MOE_SPEC,
    MoE,
    MoEArgs,
    MoETransformer,
    after_optimizer_step,
    dense_equivalent,
    flops_per_token,
    moe_layers,
    step_metrics,
)
from lingua.args import load_config
from lingua.checkpoint.weights import consolidate
from lingua.data.loader import DataLoader
from lingua.errors import ConfigError, LinguaError
from lingua.eval.generate import Generator, GeneratorArgs
from lingua.eval.load import load_model
from lingua.models.spec import spec_for_params
from lingua.models.transformer.model import flops_per_token as transformer_flops
from lingua.train.loop import train, train_args_cls
from tests.conftest import (
    assert_bits_per_byte,
    final_weights,
    losses,
    read_jsonl,
    tiny_overrides,
)

SMALL = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seqlen=32, multiple_of=16, n_experts=4, top_k=2)
MoETrainArgs = train_args_cls(MOE_SPEC)


def moe_run(corpus, dump_dir, **extra):
    base = dict(model__n_experts=4, model__top_k=2, model__multiple_of=16, model__bias_update_rate=0.01)
    return train(load_config(MoETrainArgs, tiny_overrides(corpus, dump_dir, **{**base, **extra})), MOE_SPEC)


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, straight from the definition."""
    a, e = moe.args, moe.experts
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        logits = moe.router.weight @ tok
        scores = logits.softmax(-1) if a.gate == "softmax" else logits.sigmoid()
        chosen = (scores + moe.expert_bias).topk(a.top_k).indices
        gates = scores[chosen] / (scores[chosen].sum() if a.route_norm else 1)
        y = sum(g * ((F.silu(tok @ e.w1[i]) * (tok @ e.w3[i])) @ e.w2[i]) for g, i in zip(gates, chosen))
        out.append(y + (moe.shared(tok) if hasattr(moe, "shared") else 0))
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("options", [dict(), dict(gate="sigmoid", n_shared_experts=1, top_k=3, route_norm=False)])
def test_moe_layer_is_the_definition_grouped_or_looped(options):
    torch.manual_seed(0)
    args = MoEArgs(**{**SMALL, **options})
    block = MoETransformer.build(args).layers[0]
    moe = block.feed_forward
    moe.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # expert 1 is always chosen, its gate unchanged
    x = torch.randn(2, 8, 32)
    want = reference_moe(moe, x)
    for grouped in ("true", "false"):
        moe.experts.grouped_mm = grouped
        out, aux = moe(x)
        assert torch.allclose(out, want, atol=1e-5), grouped
    # two training forwards (grouped, looped) of 16 tokens counted
    assert moe.tokens_per_expert[1] == 2 * 16 and moe.tokens_per_expert.sum() == 2 * 16 * args.top_k
    assert moe.last_losses[2] == 0  # dropless: no token slot left out
    # the weighted losses: Switch aux E * sum_i f_i P_i and the z-loss
    flat = x.reshape(-1, 32)
    logits = flat @ moe.router.weight.T
    scores = logits.softmax(-1) if args.gate == "softmax" else logits.sigmoid()
    probs = scores / scores.sum(-1, keepdim=True)
    f = moe.tokens_per_expert / 2 / (16 * args.top_k)
    want_aux = args.n_experts * (f * probs.mean(0)).sum()
    want_z = torch.logsumexp(logits, -1).square().mean()
    assert torch.allclose(aux, args.aux_loss_coef * want_aux + args.z_loss_coef * want_z, rtol=1e-5)


def test_loss_adds_the_aux_losses_and_flops_count_active_parameters():
    args = MoEArgs(**SMALL, aux_loss_coef=0.5, z_loss_coef=0.25)
    model = MoETransformer.build(args, seed=3)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    extra = sum(0.5 * m.last_losses[0] + 0.25 * m.last_losses[1] for m in moe_layers(model))
    assert torch.allclose(model(x, y), ce + extra, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(x, y), ce, rtol=1e-5)  # evaluation scores the cross-entropy alone
    # with top_k experts of dense_width / top_k, active parameters = the dense model's + the router
    dense = dense_equivalent(args)
    assert flops_per_token(args, 16) == transformer_flops(dense, 16) + 6 * args.n_layers * 32 * 4
    wide = dataclasses.replace(args, n_experts=64)  # more experts: more parameters, the same active ones
    assert flops_per_token(wide, 16) - flops_per_token(args, 16) == 6 * 2 * 32 * 60
    with pytest.raises(ConfigError, match="model.top_k=5 must be in 1..model.n_experts=4"):
        MoETransformer(MoEArgs(**{**SMALL, "top_k": 5}))
    with pytest.raises(ConfigError, match="model.gate='relu' is not one of softmax, sigmoid"):
        MoETransformer(MoEArgs(**SMALL, gate="relu"))


@pytest.mark.parametrize("selective", [False, True])
def test_aux_loss_survives_activation_checkpointing(selective):
    """Blocks return (h, aux): under activation checkpointing (full or selective) the loss, aux included, and every
    gradient, the router's (which only the aux loss reaches through the probabilities) included, are the eager ones."""
    from lingua.distributed.parallelize import apply_ac

    args = MoEArgs(**SMALL, aux_loss_coef=0.5, z_loss_coef=0.25)
    eager, wrapped = MoETransformer.build(args, seed=3), MoETransformer.build(args, seed=3)
    apply_ac(wrapped, selective=selective)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    losses = [model(x, y) for model in (eager, wrapped)]
    for loss in losses:
        loss.backward()
    ce = F.cross_entropy(eager(x).flatten(0, 1), y.flatten())
    assert losses[0] - ce > 0.1 and torch.equal(losses[0], losses[1])  # the aux losses are in, and equal
    grads = [{k.replace("._checkpoint_wrapped_module", ""): p.grad for k, p in m.named_parameters()}
             for m in (eager, wrapped)]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("logits, expected", [
    ([0.0, 0.0, 0.0, 0.0], 1.0),  # uniform probs: E * sum f_i / E = 1 whatever the choice
    # probs [3, 1, 1, 1] / 6; top-2 is experts 0 and 1 (ties: the lower index): 4 * (1/2 * 1/2 + 1/2 * 1/6) = 4/3
    ([math.log(3), 0.0, 0.0, 0.0], 4 / 3),
])
def test_aux_loss_is_the_switch_loss_of_the_routing(logits, expected):
    args = MoEArgs(**SMALL, aux_loss_coef=0.5, z_loss_coef=0.0)
    moe = MoETransformer.build(args, seed=0).layers[0].feed_forward
    with torch.no_grad():  # every token the same (all ones), so router row e / dim gives logit e to all of them
        moe.router.weight.copy_(torch.tensor(logits)[:, None].expand(4, 32) / 32)
    _, weighted = moe(torch.ones(2, 8, 32))
    # float32 rounding of the softmax and the means only
    assert moe.last_losses[0].item() == pytest.approx(expected, rel=1e-6)
    assert weighted.item() == pytest.approx(0.5 * expected, rel=1e-6)


def test_bias_update_moves_selection_towards_balance():
    args = MoEArgs(**SMALL, bias_update_rate=0.1)
    model = MoETransformer.build(args).train()
    moe = model.layers[0].feed_forward
    moe.tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    after_optimizer_step(model)
    assert moe.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.1])
    assert moe.tokens_per_expert.sum() == 0 and moe.last_load.tolist() == [10.0, 2.0, 4.0, 0.0]
    m = step_metrics(model)
    assert m["moe/load_max/0"] == 10 and m["moe/load_mean/0"] == 4 and m["moe/imbalance/0"] == 2.5


def step_after_checkpoint(dump_dir, corpus, step: int, tmp_path) -> tuple[dict, float, dict]:
    """One training forward of checkpoint `step`'s model on the next batch of its loader: (step_metrics, loss, the
    MoE metrics straight from their definition on each MoE layer's input)."""
    ckpt = dump_dir / "checkpoints" / f"{step:010d}"
    consolidate(str(ckpt), str(tmp_path / "c"))
    args = load_config(MoETrainArgs, tiny_overrides(corpus, dump_dir, model__n_experts=4, model__top_k=2,
                                                    model__multiple_of=16, model__bias_update_rate=0.01))
    model = MoETransformer.build(args.model)
    model.load_state_dict(torch.load(tmp_path / "c" / "consolidated.pth", weights_only=True)["model"])
    model.train()
    with DataLoader(args.data) as loader:
        loader.load_state_dicts([json.loads((ckpt / "train_state_00000.json").read_text())["data"]])
        batch = {k: torch.from_numpy(v) for k, v in next(loader).items()}
    inputs = []
    hooks = [m.register_forward_hook(lambda m, a, out: inputs.append((m, a[0]))) for m in moe_layers(model)]
    loss = model(batch["input"], batch["target"], tok_idx=batch["tok_idx"])
    for h in hooks:
        h.remove()
    defined, aux, z = {"moe/dropped": 0}, [], []
    for i, (moe, x) in enumerate(inputs):
        logits = moe.router(x.reshape(-1, x.shape[-1])).float()  # (n_tok, n_experts)
        probs = logits.softmax(-1)
        counts = torch.bincount((probs + moe.expert_bias).topk(2).indices.flatten(), minlength=4).float()
        aux.append(4 * (counts / counts.sum() * probs.mean(0)).sum().item())  # Switch: E * sum_i f_i P_i
        z.append(torch.logsumexp(logits, -1).square().mean().item())
        defined[f"moe/load_max/{i}"] = counts.max().item()
    defined.update({"moe/aux_loss": sum(aux) / len(aux), "moe/z_loss": sum(z) / len(z)})
    after_optimizer_step(model)  # moves the step's counts into last_load (and moves the bias), as the loop does
    return step_metrics(model), loss.item(), defined


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("moe") / "run"
    moe_run(tiny_corpus, d, steps=8, eval__at_end=True)
    return d


def test_trains_through_the_shared_loop_and_resumes_exactly(trained, tiny_corpus, tmp_path):
    rows = read_jsonl(trained / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    for r in rows:
        assert r["moe/dropped"] == 0
        assert r["moe/load_mean/0"] == 4 * 32 * 2 / 4  # batch x seq x top_k / experts
        assert r["moe/load_max/1"] >= r["moe/load_mean/1"]
    # Step 5's logged MoE numbers and loss are those of the step-4 checkpoint's model on the batch its loader state
    # gives next: one training forward, recomputed here, and the aux loss and loads also from their definition.
    recomputed, loss, defined = step_after_checkpoint(trained, tiny_corpus, 4, tmp_path)
    # bit-identical here (the same float32 ops on the same CPU); 1e-6 leaves room for another summation order only
    for key in ("moe/aux_loss", "moe/z_loss", "moe/dropped", "moe/load_max/0", "moe/load_max/1"):
        assert rows[4][key] == pytest.approx(recomputed[key], rel=1e-6, abs=0), key
        assert rows[4][key] == pytest.approx(defined[key], rel=1e-6, abs=0), key
    assert rows[4]["loss"] == pytest.approx(loss, rel=1e-6)  # cross-entropy + weighted aux and z, as trained
    weights = final_weights(trained)
    assert weights["layers.0.feed_forward.experts.w1"].shape == (4, 32, 48)  # [n_experts, dim, 96 // top_k]
    # the bias moved, and is saved: 8 updates of +-rate (0.01) or 0 each, so a multiple of 0.01 within +-0.08
    # (float32 sums of 0.01: 1e-5 of rounding), not all zero
    steps = weights["layers.0.feed_forward.expert_bias"] / 0.01
    assert (steps - steps.round()).abs().max() < 1e-3 and steps.abs().max() <= 8 + 1e-3 and steps.abs().sum() >= 1
    assert_bits_per_byte(read_jsonl(trained / "metrics.eval.jsonl")[-1], tiny_corpus, "alpha", max_docs=4)
    # interrupt after step 4, run the same command: the same losses and weights, the bias included
    cut = tmp_path / "cut"
    shutil.copytree(trained, cut, ignore=shutil.ignore_patterns("consolidated"))
    shutil.rmtree(cut / "checkpoints" / "0000000008")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 4))
    moe_run(tiny_corpus, cut, steps=8, eval__at_end=False)
    assert losses(cut) == losses(trained)
    cut_weights = final_weights(cut)
    for k in weights:
        assert torch.equal(weights[k], cut_weights[k]), k


def test_plot_draws_the_load_balance(trained, tmp_path, capsys):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    from lingua.tools.plot import main as plot_main

    assert plot_main([str(trained), "--out", str(tmp_path), "--x", "step"]) == 0
    pixels = matplotlib_image.imread(tmp_path / "moe_load_step.png")[..., :3]
    assert pixels.shape[1] > 800 and pixels.var() > 1e-3


def test_eval_and_generate_through_the_main_entry_points(trained, tmp_path):
    params = json.loads(next((trained / "checkpoints").iterdir()).joinpath("params.json").read_text())
    assert spec_for_params(params, "test") is MOE_SPEC
    results = eval_main(load_config(EvalAppArgs, [f"ckpt_dir={trained}", f"dump_dir={tmp_path}",
                                                  "validation.max_docs=4"]))
    assert results["validation"]["alpha"]["bpb"] == pytest.approx(
        read_jsonl(trained / "metrics.eval.jsonl")[-1]["alpha/bpb"], rel=1e-5)
    model, _, tok = load_model(str(trained))
    cached, _ = Generator(model, tok, GeneratorArgs(max_gen_len=12)).generate(["ROMEO:", "the king"])
    uncached, _ = Generator(model, tok, GeneratorArgs(max_gen_len=12, use_cache=False)).generate(["ROMEO:", "the king"])
    assert cached == uncached and len(cached[0]) > 0


def test_routing_is_deterministic_for_a_seed():
    args = MoEArgs(**SMALL)
    x = torch.randint(0, 64, (2, 16))
    picks = []
    for _ in range(2):
        model = MoETransformer.build(args, seed=5)
        h = model.tok_embeddings(x).reshape(-1, 32)
        picks.append(torch.topk(model.layers[0].feed_forward.router(h), 2).indices)
        model(x, x).backward()
        picks.append(torch.stack([m.last_load for m in moe_layers(model)] +
                                 [m.tokens_per_expert for m in moe_layers(model)]))
    assert torch.equal(picks[0], picks[2]) and torch.equal(picks[1], picks[3])
    other = MoETransformer.build(args, seed=6)
    assert not torch.equal(torch.topk(other.layers[0].feed_forward.router(h), 2).indices, picks[0])


# ---------------------------------------------------------------- expert parallelism (2 processes, gloo)

LOSS_ATOL = 1e-4  # as tests/test_distributed.py: fp32 summation order moves the loss by ~1e-7


def assert_close_curves(a_dir, b_dir, steps):
    """Loss and gradient norm per step (Adam hides a wrongly scaled gradient from the losses, not from the norm)."""
    a, b = ({r["step"]: r for r in read_jsonl(d / "metrics.jsonl")} for d in (a_dir, b_dir))
    for s in steps:
        assert abs(a[s]["loss"] - b[s]["loss"]) < LOSS_ATOL, (s, a[s]["loss"], b[s]["loss"])
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=1e-4), s


@pytest.mark.slow
def test_expert_parallel_continues_the_single_process_run_and_reshards_both_ways(tiny_corpus, tmp_path):
    """One process trains 8 steps (checkpoints 3, 6, 8). Two processes with ep_size=2 (+ FSDP over both) resume its
    step-3 checkpoint (1 -> 2: the [n_experts, ...] weights are cut in halves) from the real loader's global
    batches: the same losses at steps 4-8. One process then resumes the EP run's step-6 checkpoint (2 -> 1)."""
    from tests.conftest import cut_at
    from tests.dist_helpers import torchrun

    base = dict(steps=8, checkpoint__dump__every=3, optim__warmup=0, eval__at_end=False, model__n_experts=4,
                model__top_k=2, model__multiple_of=16, model__bias_update_rate=0.01)
    moe_run(tiny_corpus, tmp_path / "ref", **base)
    ep = cut_at(tmp_path / "ref", tmp_path / "ep", 3)
    torchrun(2, tiny_overrides(tiny_corpus, ep, data__batch_size=2, distributed__dp_shard=2, distributed__ep_size=2,
                               **base), ["--global-batch", "--record", str(ep / "rec"), "--spec", MOE_SPEC.path])
    assert_close_curves(tmp_path / "ref", ep, range(4, 9))
    recs = [json.loads((ep / "rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = final_weights(tmp_path / "ref")
    experts = sum(v.numel() for k, v in weights.items() if ".experts." in k)
    total = sum(v.numel() for k, v in weights.items() if not k.endswith("expert_bias"))  # parameters
    assert sum(r["local_numel"] for r in recs) == total  # FSDP + EP: every parameter on exactly one rank
    assert all(r["local_numel"] < total - experts / 2 + 1 for r in recs)  # each rank: at most half the experts
    back = cut_at(ep, tmp_path / "back", 6)
    moe_run(tiny_corpus, back, **base)
    assert_close_curves(tmp_path / "ref", back, range(7, 9))
    back_weights = final_weights(back)
    for k, v in weights.items():
        assert torch.allclose(v, back_weights[k], atol=1e-4), k
    with pytest.raises(ConfigError, match="distributed.ep_size=3 must divide the 2 data-parallel ranks"):
        from lingua.distributed.mesh import DistributedArgs, resolve_mesh_shape
        resolve_mesh_shape(DistributedArgs(dp_shard=2, ep_size=3), 2)


# ---------------------------------------------------------------- Hugging Face export (MixtralForCausalLM)


def test_mixtral_export_matches_transformers_and_refuses_what_it_cannot_express(tmp_path):
    transformers = pytest.importorskip("transformers")
    from apps.moe.hf_mixtral import MIXTRAL
    from lingua.hf import io as hf

    args = MoEArgs(**{**SMALL, "n_kv_heads": 2}, weight_tying=True)
    model = MoETransformer.build(args, seed=1).eval()
    out = hf.export_hf(MOE_SPEC.hf, model.state_dict(), args, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        ours, hf_logits = model(x), theirs(x).logits
    assert torch.allclose(ours, hf_logits, atol=1e-4), (ours - hf_logits).abs().max()
    back_args = hf.args_from_hf(out, MOE_SPEC.hf)  # and back: the same model from the directory
    assert (back_args.n_experts, back_args.top_k, back_args.moe_hidden_dim) == (4, 2, 48)
    back = MoETransformer.build(back_args, seed=9).eval()
    hf.load_hf_weights(out, back, MOE_SPEC.hf)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    again = hf.export_hf(MOE_SPEC.hf, back.state_dict(), back_args, tmp_path / "again")  # the same bytes out again
    assert all((again / f).read_bytes() == (out / f).read_bytes() for f in ("model.safetensors", "config.json"))
    for bad, what in ((dict(gate="sigmoid"), "model.gate=sigmoid"), (dict(n_shared_experts=1), "a shared expert"),
                      (dict(bias_update_rate=0.001), "a selection bias")):
        bad_args = dataclasses.replace(args, **bad)
        with pytest.raises(LinguaError, match=rf"\(MixtralForCausalLM: {what}\): export refused$"):
            hf.export_hf(MIXTRAL, MoETransformer.build(bad_args).state_dict(), bad_args, tmp_path / "bad")


def test_expert_counts_equal_bincount_without_its_host_sync():
    from apps.moe.model import expert_counts

    ids = torch.randint(0, 8, (37, 2), generator=torch.Generator().manual_seed(0))
    counts = expert_counts(ids, 8)
    assert counts.dtype == torch.long and counts.tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()
    assert expert_counts(torch.full((5, 2), 3), 8).tolist() == [0, 0, 0, 10, 0, 0, 0, 0]  # unused experts: 0


def test_grouped_gemm_in_bf16_with_padded_dims_matches_the_plain_one():
    """What CUDA's grouped GEMM gets (lingua can only run it on CPU here): bf16 operands, dim and hidden padded to
    multiples of 8; the result comes back in fp32 and equals the unpadded product in bf16."""
    from apps.moe.grouped import compute_dtype, grouped_swiglu, pad_to, padded

    assert [padded(n) for n in (1, 8, 12, 256)] == [8, 8, 16, 256]
    assert compute_dtype("cuda", torch.float32, None) == torch.bfloat16  # autocast has no _grouped_mm rule
    assert compute_dtype("cuda", torch.float32, torch.float16) == torch.float16
    assert compute_dtype("cpu", torch.float32, torch.bfloat16) == torch.float32
    t = torch.ones(2, 3)
    assert pad_to(t, (2, 3)) is t and pad_to(t, (2, 8)).shape == (2, 8) and pad_to(t, (2, 8))[:, 3:].abs().sum() == 0
    g = torch.Generator().manual_seed(0)
    x, w1, w3, w2 = (torch.randn(*s, generator=g) for s in ((10, 12), (3, 12, 20), (3, 12, 20), (3, 20, 12)))
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # expert 1 gets no rows
    with pytest.raises(RuntimeError, match="strides should be multiple of 16 bytes"):  # torch's own check
        grouped_swiglu(x, w1, w3, w2, offs, dtype=torch.bfloat16)  # 12 bf16 = 24 bytes
    aligned = grouped_swiglu(x, w1, w3, w2, offs, align=8, dtype=torch.bfloat16)
    assert aligned.dtype == torch.float32 and aligned.shape == (10, 12)
    exact = grouped_swiglu(x, w1, w3, w2, offs)  # fp32 rows are 48 bytes: no padding needed
    assert torch.allclose(grouped_swiglu(x, w1, w3, w2, offs, align=8), exact, rtol=1e-6, atol=1e-5)  # zeros add 0
    ref = torch.cat([F.silu(x[a:b] @ w1[e]) * (x[a:b] @ w3[e]) @ w2[e] for e, (a, b) in enumerate([(0, 4), (4, 4), (4, 10)])])
    assert torch.allclose(exact, ref, rtol=1e-5, atol=1e-4)
    err = ((aligned - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.02, err  # bf16 rounding (it did run in bf16), not a different product
