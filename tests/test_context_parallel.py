"""Context parallelism (distributed.cp_size): the ring attention kernel against full attention in one process, then
real torchrun runs on gloo against the one-process run of the same global batches.

Tolerance: CP computes the same math in another fp32 order (attention merged from blocks by log-sum-exp, gradients
averaged over the cp ranks): we measured <= 5e-7 on the loss over 8 steps; LOSS_ATOL = 1e-5 as the issue asks. A
broken ring shows far outside it: K/V gradients that stay where they were computed instead of travelling home
changed the gradient norm at step 1 by 6e-3 relative and the loss at step 3 by 1e-2.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lingua.args import load_config
from lingua.data.loader import DataLoader
from lingua.distributed.context_parallel import check_context_parallel
from lingua.distributed.mesh import DistributedArgs
from lingua.distributed.parallelize import parallelize_decoder
from lingua.errors import ConfigError
from lingua.kernels.attention.ring import attend_shard, block_plans, chunk_ids, grad_shard, local_positions
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.models.transformer.parallelize import apply_transformer_cp
from lingua.train.loop import TrainArgs
from tests.conftest import ROOT, cut_at, read_jsonl, tiny_overrides
from tests.dist_helpers import torchrun

LOSS_ATOL = 1e-5
GNORM_RTOL = 1e-5
STEPS, EVERY, BATCH, SEQ = 8, 4, 4, 32


# ---------------------------------------------------------------- one process: the ring's math, emulated


def _tok_idx(bs: int, seqlen: int, starts: list[list[int]]) -> torch.Tensor:
    """Positions inside documents for rows whose documents start at `starts[row]` (0 is always a start)."""
    tok_idx = torch.zeros(bs, seqlen, dtype=torch.long)
    for row, row_starts in enumerate(starts):
        bounds = sorted({0, *row_starts}) + [seqlen]
        for a, b in zip(bounds, bounds[1:]):
            tok_idx[row, a:b] = torch.arange(b - a)
    return tok_idx


def _emulated_ring(q, k, v, do, tok_idx, cp):
    """Every rank's forward and backward of the ring, in one process: rank r's queries against the K/V shard of
    rank (r - step) at each step, the K/V gradients summed per shard as the travelling accumulator sums them.
    q, k, v, do: global (bs, heads, seqlen, head_dim). Returns (out, dq, dk, dv), global."""
    local = q.shape[2] // cp
    pos = [local_positions(r, cp, local) for r in range(cp)]
    kv = [torch.stack([k[:, :, p], v[:, :, p]]) for p in pos]
    dkv = [torch.zeros_like(s) for s in kv]
    out, dq = torch.empty_like(q), torch.empty_like(q)
    for r, p in enumerate(pos):
        plans = None if tok_idx is None else block_plans(p[None] - tok_idx[:, p], r, cp)
        o = torch.zeros(q.shape[:2] + (local, q.shape[3]))
        lse = torch.full(q.shape[:2] + (local,), float("-inf"))
        sources = [(r - step) % cp for step in range(cp)]
        for s in sources:
            attend_shard(q[:, :, p], kv[s], chunk_ids(r, cp), chunk_ids(s, cp), plans, o, lse)
        g = torch.zeros_like(o)
        for s in sources:
            grad_shard(do[:, :, p].contiguous(), q[:, :, p], kv[s], o, lse, chunk_ids(r, cp), chunk_ids(s, cp),
                       plans, g, dkv[s])
        out[:, :, p], dq[:, :, p] = o, g
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for p, g in zip(pos, dkv):
        dk[:, :, p], dv[:, :, p] = g[0], g[1]
    return out, dq, dk, dv


@pytest.mark.parametrize("cp, starts", [
    (2, None),  # causal
    (2, [[5], [0, 9, 10]]),  # documents starting inside chunks (chunks of 4), one of a single token
    (3, [[5, 13], [2, 17]]),
    (4, [[7, 9, 25], [30]]),
])
def test_ring_math_matches_full_attention(cp, starts):
    torch.manual_seed(0)
    bs, heads, kv_heads, seqlen, head_dim = 2, 4, 2, 8 * cp, 8  # grouped-query: 2 query heads per K/V head
    q = torch.randn(bs, heads, seqlen, head_dim)
    k, v = torch.randn(bs, kv_heads, seqlen, head_dim), torch.randn(bs, kv_heads, seqlen, head_dim)
    do = torch.randn(bs, heads, seqlen, head_dim)
    tok_idx = None if starts is None else _tok_idx(bs, seqlen, starts)
    allowed = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    if tok_idx is not None:
        docs = torch.cumsum(tok_idx == 0, dim=1)
        allowed = (allowed & (docs[:, :, None] == docs[:, None, :])).unsqueeze(1)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr.repeat_interleave(2, 1), vr.repeat_interleave(2, 1), attn_mask=allowed)
    ref.backward(do)
    out, dq, dk, dv = _emulated_ring(q, k, v, do, tok_idx, cp)
    for got, want in ((out, ref), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    assert ref.abs().max() > 0.1 and kr.grad.abs().max() > 0.1  # real numbers, not zeros matching zeros


def test_block_plans_skip_what_the_documents_hide():
    # rank 0 of cp=2 (16 tokens, chunks of 4) holds chunks 0 and 3; its last chunk's queries (12..15) are in a
    # document that starts at 10
    doc_start = torch.tensor([[0, 0, 0, 0, 10, 10, 10, 10]])
    plans = block_plans(doc_start, rank=0, cp=2)
    assert plans[0, 0] == (True, None) and plans[0, 1] is None  # causal diagonal; the future
    assert plans[3, 0] is None and plans[3, 1] is None  # keys 0..7: before the document, skipped
    is_causal, allowed = plans[3, 2]  # keys 8..11: the document's first two
    assert not is_causal and allowed[0, 0].tolist() == [[False, False, True, True]] * 4
    assert plans[3, 3] == (True, None)  # the whole chunk is inside the document: causal, no mask


# ---------------------------------------------------------------- bad input, one line


def test_seq_len_not_divisible_by_two_cp_is_one_line():
    args = load_config(TrainArgs, ["data.seq_len=36", "distributed.cp_size=4"])
    with pytest.raises(ConfigError) as e:
        check_context_parallel(args)
    assert str(e.value) == ("data.seq_len=36 is not divisible by 2 x distributed.cp_size = 8: context parallelism "
                            "cuts every sequence into 2 x cp_size equal chunks")
    check_context_parallel(load_config(TrainArgs, ["data.seq_len=32", "distributed.cp_size=4"]))  # fine


class _FakeMesh:
    def __init__(self, sizes: dict):
        self.sizes = sizes

    def __getitem__(self, dim):
        return _FakeMesh({dim: self.sizes[dim]})

    def size(self):
        return next(iter(self.sizes.values()))


@pytest.mark.parametrize("impl", ["xformers", "flex_attention"])
def test_attention_that_cannot_ring_is_refused(impl):
    with torch.device("meta"):
        model = Transformer(TransformerArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, attn_impl=impl))
    with pytest.raises(ConfigError) as e:
        apply_transformer_cp(model, _FakeMesh({"cp": 2}))
    assert str(e.value) == (f"model.attn_impl={impl} cannot ring over distributed.cp_size=2 ranks: context "
                            "parallelism runs ring attention on SDPA's kernels (set model.attn_impl=sdpa)")


@pytest.mark.parametrize("app", ["fastRNN", "mamba"])
def test_model_without_attention_is_refused(app):
    module = __import__(f"apps.{app}.model", fromlist=["x"])
    spec = next(v for v in vars(module).values() if type(v).__name__ == "ModelSpec")
    with torch.device("meta"):
        model = spec.build(spec.args_cls(dim=32, n_layers=1, vocab_size=64))
    with pytest.raises(ConfigError) as e:
        parallelize_decoder(model, _FakeMesh({"tp": 1, "cp": 2}), DistributedArgs(cp_size=2), name=app)
    assert str(e.value) == f"{app} has no context-parallel plan (no attention to ring): set distributed.cp_size=1"


# ---------------------------------------------------------------- real processes


def write_short_docs(root: Path, n_docs=400, seed=0) -> Path:
    """One source of 3-12 byte documents: with BOS/EOS, every 32-token row has document starts inside its 8-token
    chunks (asserted below), so the block-causal mask crosses the cp chunk boundaries."""
    rng = random.Random(seed)
    folder = root / "short"
    folder.mkdir(parents=True, exist_ok=True)
    words = "ab cd ef gh ij kl mn op".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(n_docs + 8)]
    (folder / "short.chunk.00.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:n_docs]))
    (folder / "short.val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[n_docs:]))
    return root


def cfg(corpus: Path, dump_dir: Path, **extra) -> list[str]:
    base = dict(steps=STEPS, checkpoint__dump__every=EVERY, optim__warmup=0, data__batch_size=BATCH,
                data__seq_len=SEQ, data__sources__alpha=None, data__sources__short=1.0)
    overrides = tiny_overrides(corpus, dump_dir, **{**base, **extra})
    return [o for o in overrides if not o.startswith("data.sources.alpha=")]


def curve(dump_dir) -> dict:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(Path(dump_dir) / "metrics.jsonl")}


def assert_same_curve(ref: dict, got: dict):
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        (l0, g0), (l1, g1) = ref[s], got[s]
        assert abs(l0 - l1) <= LOSS_ATOL, f"step {s}: loss {l1} vs single-process {l0}"
        assert abs(g0 - g1) <= GNORM_RTOL * g0, f"step {s}: grad norm {g1} vs single-process {g0}"


def one_process(overrides: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "tests.dist_helpers", "--global-batch", "--"] + overrides, cwd=ROOT,
                   check=True, capture_output=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def resumes_bit_identically(corpus: Path, run: Path, tmp: Path, nproc: int, **layout) -> None:
    """Cut `run` after the checkpoint of step EVERY, continue it with the same layout: the same losses, exactly."""
    cut = cut_at(run, tmp / f"{run.name}_resumed", EVERY)
    torchrun(nproc, cfg(corpus, cut, **layout), ["--global-batch"])
    assert curve(cut) == curve(run)


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Path:
    return write_short_docs(tmp_path_factory.mktemp("short_docs"))


@pytest.fixture(scope="module")
def ref(short_docs, tmp_path_factory):
    """The one-process runs (block-causal and causal), computed once, on first use."""
    root, cache = tmp_path_factory.mktemp("cp_ref"), {}

    def get(mask: str) -> Path:
        if mask not in cache:
            one_process(cfg(short_docs, root / mask, model__mask=mask))
            cache[mask] = root / mask
        return cache[mask]

    return get


@pytest.mark.slow  # ~75 s on 2 loaded cores: one process, CP=2, the CP=2 resume
def test_cp2_block_causal_across_chunks_matches_one_process_and_resumes(short_docs, ref, tmp_path):
    overrides = cfg(short_docs, tmp_path / "cp2", distributed__cp_size=2)
    with DataLoader(load_config(TrainArgs, overrides).data) as loader:
        tok_idx = next(loader)["tok_idx"]
    starts = torch.from_numpy(tok_idx == 0).nonzero()[:, 1]
    assert ((starts % (SEQ // 4)) != 0).sum() > 10  # documents start inside the 4 chunks of 8 tokens
    torchrun(2, overrides, ["--global-batch"])
    assert_same_curve(curve(ref("block_causal")), curve(tmp_path / "cp2"))
    # evaluation at the end: logits gathered back into sequence order, each batch counted once
    (e0,), (e1,) = read_jsonl(ref("block_causal") / "metrics.eval.jsonl"), read_jsonl(tmp_path / "cp2" /
                                                                                      "metrics.eval.jsonl")
    assert e0["short/tokens"] == e1["short/tokens"] and abs(e0["short/nll"] - e1["short/nll"]) < LOSS_ATOL
    resumes_bit_identically(short_docs, tmp_path / "cp2", tmp_path, 2, distributed__cp_size=2)


@pytest.mark.slow  # ~60-95 s: one process, then 4 processes twice
def test_cp2_x_dp_shard2_causal_matches_one_process_and_resumes(short_docs, ref, tmp_path):
    layout = dict(model__mask="causal", distributed__cp_size=2, distributed__dp_shard=2, data__batch_size=BATCH // 2)
    torchrun(4, cfg(short_docs, tmp_path / "cp2dp2", **layout), ["--global-batch"])
    assert_same_curve(curve(ref("causal")), curve(tmp_path / "cp2dp2"))
    resumes_bit_identically(short_docs, tmp_path / "cp2dp2", tmp_path, 4, **layout)


@pytest.mark.slow  # ~35 s: 4 processes once (the one-process run is shared with the block-causal test)
def test_cp2_x_tp2_matches_one_process(short_docs, ref, tmp_path):
    # tensor parallel inside each cp rank's chunks: heads split over tp, the ring over the cp ranks of one tp rank
    torchrun(4, cfg(short_docs, tmp_path / "cp2tp2", distributed__cp_size=2, distributed__tp_size=2,
                    checkpoint__dump__every=0, eval__at_end=False), ["--global-batch"])
    assert_same_curve(curve(ref("block_causal")), curve(tmp_path / "cp2tp2"))


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_every_rank_holds_an_equal_share_of_the_causal_triangle(cp):
    # load balance: rank r holds chunks r and 2cp-1-r, so each rank's query rows see the same number of causal keys
    # (chunk c of 2cp attends to c + 1 chunks, counting its own diagonal one as a whole)
    from lingua.kernels.attention.ring import chunk_ids

    held = [chunk_ids(r, cp) for r in range(cp)]
    assert sorted(c for pair in held for c in pair) == list(range(2 * cp))  # every chunk once
    assert {sum(c + 1 for c in pair) for pair in held} == {2 * cp + 1}
