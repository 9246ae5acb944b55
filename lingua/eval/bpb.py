"""Validation without a harness: per source NLL per token, perplexity and bits per byte on `<source>.val.jsonl`.

bits per byte = (sum of the NLL of every scored token, in nats) / ln 2 / (UTF-8 bytes of the evaluated text), which
is comparable across tokenizers, unlike per-token loss.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from lingua.data.loader import DataArgs
from lingua.data.validation import val_iterator
from lingua.kernels.loss import IGNORE_INDEX, cross_entropy
from lingua.train.metrics import Progress

logger = logging.getLogger(__name__)


@dataclass
class EvalArgs:
    every: int = 0  # evaluate every N train steps (0: never during training; at_end decides about the end)
    at_end: bool = True  # evaluate once more when training ends
    max_docs: Optional[int] = None  # per source; None evaluates the whole val split
    batch_size: int = 4  # rows per evaluation batch, per data-parallel rank
    seq_len: Optional[int] = None  # defaults to data.seq_len
    sources: list[str] = field(default_factory=list)  # val splits to score (held-out corpora too); empty: data.sources


def _token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of NLL (nats, fp32) over scored targets, and how many were scored (padding: target < 0 or mask == 0)."""
    logits = model(batch["input"], tok_idx=batch["tok_idx"])
    if hasattr(logits, "full_tensor"):  # tensor parallel keeps logits sharded over the vocabulary
        logits = logits.full_tensor()
    target = batch["target"]
    if "mask" in batch:  # val_iterator pads with token 0 and marks the real targets in `mask`
        target = target.masked_fill(batch["mask"] == 0, IGNORE_INDEX)
    return cross_entropy(logits, target, reduction="sum"), (target != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate_source(model, root_dir, source, tokenizer, args: EvalArgs, data_args: DataArgs, dist_state, autocast,
                    progress: bool = False) -> dict:
    """One source's val split; `progress` shows a bar on a terminal (rank 0), since a full split takes a while."""
    seq_len = args.seq_len or data_args.seq_len
    batches = list(val_iterator(root_dir, source, tokenizer, seq_len, args.batch_size, max_docs=args.max_docs,
                                add_bos=data_args.add_bos, add_eos=data_args.add_eos, data_format=data_args.format,
                                tokenizer_args=data_args.tokenizer))
    device = dist_state.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    # Every rank runs the same number of forwards (FSDP all-gathers need all of them); extra ones count for nothing.
    rounds = math.ceil(len(batches) / dist_state.dp_size)
    bar = Progress(rounds, enabled=progress and dist_state.is_main, desc=f"eval {source}", unit="batch")
    for r in range(rounds):
        bar.update(r)
        i = r * dist_state.dp_size + dist_state.dp_rank
        batch, n_bytes = batches[min(i, len(batches) - 1)]
        t = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        with autocast:
            nll, n = _token_nll(model, t)
        if i < len(batches):
            totals += torch.stack([nll.double(), n.double(), torch.tensor(float(n_bytes), dtype=torch.float64, device=device)])
    bar.close()
    if dist_state.tp_size * dist_state.cp_size > 1:
        totals /= dist_state.tp_size * dist_state.cp_size  # every tp and cp rank of a dp group scored the same batch
    dist_state.all_reduce(totals)
    nll, tokens, n_bytes = totals.tolist()
    if tokens == 0:
        return {}
    return {
        f"{source}/nll": nll / tokens,
        f"{source}/ppl": math.exp(min(nll / tokens, 50.0)),
        f"{source}/bpb": nll / math.log(2) / n_bytes,
        f"{source}/tokens": int(tokens),
        f"{source}/bytes": int(n_bytes),
    }


def evaluate(model, data_args: DataArgs, args: EvalArgs, tokenizer, dist_state, autocast, progress=False) -> dict:
    """Evaluate every training source that has a val split; the model is left in train mode. A compiled model runs
    eagerly here: compiling its no-grad graph at evaluation's batch shape would cost more than the few evaluation
    forwards gain."""
    results = {}
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            for source in args.sources or data_args.sources:
                path = os.path.join(data_args.root_dir, source, f"{source}.val.jsonl")
                if not os.path.isfile(path):
                    logger.warning(f"no validation split for '{source}' ({path}): skipped")
                    continue
                results.update(evaluate_source(model, data_args.root_dir, source, tokenizer, args, data_args, dist_state,
                                               autocast, progress))
    finally:
        model.train(was_training)
    return results
