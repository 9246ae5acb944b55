"""lingua/eval/bpb.py on several data-parallel ranks (real gloo processes, spawned by the test): each rank scores its
share of the val batches, and the rounds that pad a short last share (every rank must run the same number of
forwards under FSDP) count for nothing, so the ranks together give one process's numbers."""

import contextlib
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lingua.data.batches import DataArgs
from lingua.data.tokenizer import TokenizerArgs, build_tokenizer
from lingua.data.validation import val_iterator
from lingua.distributed.mesh import DistEnv, DistState
from lingua.eval.bpb import EvalArgs, evaluate_source
from lingua.models.transformer.model import Transformer, TransformerArgs
from tests.dist_helpers import free_port

EVAL = EvalArgs(batch_size=1, max_docs=3)


def _model() -> Transformer:
    return Transformer.build(TransformerArgs(dim=32, n_layers=1, n_heads=4, vocab_size=258, max_seqlen=64), seed=0)


def _score(corpus, rank: int, size: int) -> dict:
    model = _model()
    data = DataArgs(root_dir=str(corpus), sources={"alpha": 1.0}, seq_len=32, tokenizer=TokenizerArgs("bytes"))
    state = DistState(DistEnv("spawn", rank, size), torch.device("cpu"), None, rank, size, 1)
    return evaluate_source(model, corpus, "alpha", build_tokenizer("bytes", None), EVAL, data, state,
                           contextlib.nullcontext())


def _rank(rank: int, size: int, port: int, corpus, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        out[rank] = _score(corpus, rank, size)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dp_size", [2, 3])
def test_ranks_together_score_every_val_token_once(tiny_corpus, dp_size):
    n_batches = len(list(val_iterator(tiny_corpus, "alpha", build_tokenizer("bytes", None), 32, 1, max_docs=3)))
    assert n_batches % dp_size, "the split must leave padding rounds for this test to mean anything"
    whole = _score(tiny_corpus, 0, 1)
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(dp_size, free_port(), tiny_corpus, out), nprocs=dp_size)
    for rank in range(dp_size):  # every rank reports the all-reduced totals
        assert out[rank]["alpha/tokens"] == whole["alpha/tokens"] and out[rank]["alpha/bytes"] == whole["alpha/bytes"]
        # fp32 sums of the same per-token losses in another order
        assert out[rank]["alpha/bpb"] == pytest.approx(whole["alpha/bpb"], rel=1e-6)


def test_bits_per_byte_is_the_nll_in_bits_over_the_utf8_bytes_of_the_text(tiny_corpus):
    """The definition by hand: the summed NLL (nats) of every real target, / ln 2, / the UTF-8 bytes of the first
    max_docs documents of the val file."""
    model, nll = _model(), 0.0
    with torch.no_grad():
        for batch, _ in val_iterator(tiny_corpus, "alpha", build_tokenizer("bytes", None), 32, 1, max_docs=3):
            b = {k: torch.from_numpy(v) for k, v in batch.items()}
            real = b["mask"] == 1
            logits = model(b["input"], tok_idx=b["tok_idx"])
            nll += F.cross_entropy(logits[real].double(), b["target"][real], reduction="sum").item()
    with open(tiny_corpus / "alpha" / "alpha.val.jsonl") as f:
        n_bytes = sum(len(json.loads(line)["text"].encode()) for line in list(f)[:3])
    got = _score(tiny_corpus, 0, 1)
    assert got["alpha/bytes"] == n_bytes
    # fp32 logits summed in another order than the fp64 reference
    assert got["alpha/bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)
