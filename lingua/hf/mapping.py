"""What one lingua architecture needs to say to map onto a transformers class (`HFMapping`, one per file in its model
package: lingua/models/transformer/hf_llama.py, ...), and which of a model's mappings an export takes (`choose`).
The directory reading and writing that uses them is lingua/hf/io.py.

A ModelSpec lists its mappings in order of preference, native transformers classes first and lingua's own
remote-code class (lingua/hf/remote/) last. Export takes the first whose computation is exactly the checkpoint's;
a class that cannot express a switch is never used as an approximation. Import picks the mapping by config.json's
`model_type`.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from lingua.errors import LinguaError

logger = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class HFMapping:
    """How one lingua architecture maps onto one transformers class."""

    architecture: str  # the class config.json names, e.g. "LlamaForCausalLM"
    model_types: tuple[str, ...]  # the config.json `model_type`s it reads
    config: Callable[..., dict]  # (args, bos_id, eos_id, dtype) -> config.json
    args_from_config: Callable[[Path, dict], Any]  # (config.json path, its content) -> model args, or one line why not
    to_hf: Callable[[dict, Any], dict]  # (our state dict, args) -> their tensors
    from_hf: Callable[[dict, Any], dict]  # (their tensors, args) -> our state dict
    check_matches: Callable[[Any, Any, Any], None]  # (their args, our args, path): refuse another shape
    # args -> None when the class computes exactly this model, else the switch it cannot express (one phrase)
    unsupported: Callable[[Any], Optional[str]] = lambda args: None
    remote_code: bool = False  # lingua's own class (lingua/hf/remote/): loads with trust_remote_code=True


Mappings = Union[HFMapping, Sequence[HFMapping], None]


def as_tuple(mappings: Mappings) -> tuple[HFMapping, ...]:
    if mappings is None:
        return ()
    return (mappings,) if isinstance(mappings, HFMapping) else tuple(mappings)


def choose(mappings: Mappings, args) -> HFMapping:
    """The first mapping that expresses `args` exactly; the log says which class and why the ones before it were
    skipped. None fits: one line naming each class's missing switch."""
    skipped = []
    for m in as_tuple(mappings):
        why = m.unsupported(args)
        if why is None:
            kind = "lingua remote code, load with trust_remote_code=True" if m.remote_code else "native transformers"
            reason = f" because {'; '.join(skipped)}" if skipped else ""
            logger.info(f"exporting as {m.architecture} ({kind}){reason}")
            return m
        skipped.append(f"{m.architecture}: {why}")
    if not skipped:
        raise LinguaError(f"{type(args).__name__} models have no Hugging Face equivalent: nothing to export to")
    raise LinguaError(f"no Hugging Face class computes this model exactly ({'; '.join(skipped)}): export refused")


def for_model_type(mappings: Mappings, model_type: Optional[str], where) -> HFMapping:
    """The mapping that reads config.json's `model_type`, or one line naming those it could be."""
    for m in as_tuple(mappings):
        if model_type in m.model_types:
            return m
    known = ", ".join(t for m in as_tuple(mappings) for t in m.model_types) or "none"
    raise LinguaError(f"{where}: model_type '{model_type}' is not supported here, only {known}")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP/TP shard) -> the whole tensor
