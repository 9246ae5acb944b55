"""What one lingua architecture needs to say to map onto a transformers one (`HFMapping`, in its model package's
hf.py); the directory reading and writing that uses it is lingua/hf/io.py."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class HFMapping:
    """How one lingua architecture maps onto a transformers one."""

    model_types: tuple[str, ...]  # the config.json `model_type`s it reads
    config: Callable[..., dict]  # (args, bos_id, eos_id, dtype) -> config.json
    args_from_config: Callable[[Path, dict], Any]  # (config.json path, its content) -> model args, or one line why not
    to_hf: Callable[[dict, Any], dict]  # (our state dict, args) -> their tensors
    from_hf: Callable[[dict, Any], dict]  # (their tensors, args) -> our state dict
    check_matches: Callable[[Any, Any, Any], None]  # (their args, our args, path): refuse another shape
    check_exportable: Optional[Callable[[Any], None]] = None  # args -> None, or one line naming what has no equivalent


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP/TP shard) -> the whole tensor
