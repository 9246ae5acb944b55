"""The MTP model's Hugging Face export: its next-token head as a plain causal LM. The trunk plus head 0 (layers 0 ..
n_layers), the shared norm and unembedding are an (n_layers + 1)-layer lingua Transformer, so each of the
transformer's classes (lingua/models/transformer/spec.py: native Llama / Qwen3 / Arcee, else lingua's remote code)
serves, wrapped here; the extra heads (layers n_layers + 1 ...) have no place in a causal LM and are dropped with a
warning (apps.mtp.speculative needs them: keep the lingua checkpoint for that). A Hugging Face directory starts an
MTP run only with n_future_head=1, where the model is exactly that transformer."""

import dataclasses
import logging
import re
from functools import partial

from lingua.errors import LinguaError
from lingua.hf.mapping import HFMapping
from lingua.models.transformer.model import TransformerArgs
from lingua.models.transformer.spec import TRANSFORMER_HF

logger = logging.getLogger(__name__)


def main_head_args(args) -> TransformerArgs:
    """The transformer the next-token head computes: the trunk's blocks and head 0's."""
    names = {f.name for f in dataclasses.fields(TransformerArgs)}
    fields = {k: v for k, v in dataclasses.asdict(args).items() if k in names}
    return TransformerArgs(**{**fields, "n_layers": args.n_layers + 1})


def main_head_state(state: dict, args) -> dict:
    """The state dict without the extra heads' blocks."""
    if args.n_future_head > 1:
        logger.warning(f"MTP export: the next-token head only; the {args.n_future_head - 1} extra head(s) (layers "
                       f"{args.n_layers + 1}..{args.n_layers + args.n_future_head - 1}) are dropped")
    layer = lambda name: int(m.group(1)) if (m := re.match(r"layers\.(\d+)\.", name)) else -1  # noqa: E731
    return {k: v for k, v in state.items() if layer(k) <= args.n_layers}


# the wrapped mapping's functions, on the main head's args and state (partials of these, which pickle)
def _config(mapping: HFMapping, args, *rest) -> dict:
    return mapping.config(main_head_args(args), *rest)


def _to_hf(mapping: HFMapping, state: dict, args) -> dict:
    return mapping.to_hf(main_head_state(state, args), main_head_args(args))


def _from_hf(mapping: HFMapping, hf_state: dict, args) -> dict:
    if args.n_future_head > 1:
        raise LinguaError(f"a Hugging Face causal LM has one head: it starts an MTP model only with "
                          f"model.n_future_head=1 (got {args.n_future_head})")
    return mapping.from_hf(hf_state, main_head_args(args))


def _check_matches(mapping: HFMapping, hf_args, args, path) -> None:
    mapping.check_matches(hf_args, main_head_args(args), path)


def _unsupported(mapping: HFMapping, args):
    return mapping.unsupported(main_head_args(args))


def main_head_mapping(mapping: HFMapping) -> HFMapping:
    """`mapping` (one of the transformer's) applied to the MTP model's next-token head."""
    return dataclasses.replace(mapping, config=partial(_config, mapping), to_hf=partial(_to_hf, mapping),
                               from_hf=partial(_from_hf, mapping), check_matches=partial(_check_matches, mapping),
                               unsupported=partial(_unsupported, mapping))


MTP_HF = tuple(main_head_mapping(m) for m in TRANSFORMER_HF)
