"""Weights without a run: load a model's weights from any checkpoint kind (DCP dir, consolidated file, Hugging Face
dir) into any layout, and consolidate a DCP checkpoint into one plain file
(`python -m lingua.checkpoint consolidate <ckpt_dir> <out_dir>`)."""

import contextlib
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from lingua.checkpoint.integrity import verify
from lingua.errors import ConfigError, LinguaError, exit_on_error
from lingua.files import write_atomic
from lingua.hf.io import load_hf_weights

CONSOLIDATED = "consolidated.pth"


def last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


@contextlib.contextmanager
def single_process_is_fine():
    """DCP warns on every save/load without a process group; one process is a supported layout here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_load(state: dict, path: Path) -> None:
    """dcp.load with a one-line error for a corrupt checkpoint or one from another model."""
    try:
        with single_process_is_fine():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, dcp.api.CheckpointException) as e:  # DCP wraps per-rank failures (a BaseException)
        msg = str(e)
        for line in msg.splitlines():
            if "size mismatch" in line or "Missing key" in line or "missing" in line.lower() or "shape" in line:
                msg = line.strip()
                break
        else:
            msg = msg.splitlines()[-1].strip() if msg.strip() else type(e).__name__
        raise LinguaError(f"cannot load checkpoint '{path}': {msg}") from None


def load_model_weights(path: str, model: nn.Module, hf_mapping=None) -> None:
    """Load weights only (no optimizer) into any layout, from a DCP checkpoint dir, a consolidated dir, or a Hugging
    Face dir read through `hf_mapping` (the model's ModelSpec.hf)."""
    p = Path(path)
    if not p.exists():
        raise LinguaError(f"checkpoint path '{path}' does not exist")
    if (p / CONSOLIDATED).is_file():
        sd = torch.load(p / CONSOLIDATED, map_location="cpu", weights_only=True)["model"]
        _check_shapes(sd, model, path)
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        load_hf_weights(p, model, hf_mapping)
        return
    if not (p / ".metadata").is_file():
        raise LinguaError(f"'{path}' is not a checkpoint (no .metadata, {CONSOLIDATED} or Hugging Face config.json)")
    verify(p)
    sd = get_model_state_dict(model)
    check_dcp_shapes(sd, p)
    state = {"model": sd}
    dcp_load(state, p)
    set_model_state_dict(model, state["model"])


def _check_shapes(sd: dict, model: nn.Module, path) -> None:
    want = get_model_state_dict(model)
    for k, v in want.items():
        if k not in sd:
            raise LinguaError(f"checkpoint '{path}' is from another model: parameter '{k}' is missing")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise LinguaError(f"checkpoint '{path}' is from another model: '{k}' has shape {tuple(sd[k].shape)}, the model has {tuple(v.shape)}")


def check_dcp_shapes(sd: dict, path: Path):
    """Name the mismatched parameter before DCP fails with a less readable error; returns the DCP metadata."""
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise LinguaError(f"cannot read checkpoint '{path}': {type(e).__name__}: {e}") from None
    for k, v in sd.items():
        item = meta.state_dict_metadata.get(f"model.{k}")
        if item is None:
            raise LinguaError(f"checkpoint '{path}' is from another model: parameter '{k}' is missing")
        if hasattr(item, "size") and tuple(item.size) != tuple(v.shape):
            raise LinguaError(f"checkpoint '{path}' is from another model: '{k}' has shape {tuple(item.size)}, the model has {tuple(v.shape)}")
    return meta


def consolidate(ckpt_dir: str, out_dir: str) -> Path:
    """DCP -> one `consolidated.pth` holding {"model": state_dict} plus params.json, via DCP's own conversion."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src, out = Path(ckpt_dir), Path(out_dir)
    if not (src / ".metadata").is_file():
        raise LinguaError(f"'{ckpt_dir}' is not a DCP checkpoint (no .metadata)")
    verify(src)
    out.mkdir(parents=True, exist_ok=True)
    full = out / "full.pth.tmp"
    try:
        dcp_to_torch_save(str(src), str(full))
    except (Exception, dcp.api.CheckpointException) as e:  # a truncated shard fails deep in DCP's stream reader
        full.unlink(missing_ok=True)
        raise LinguaError(f"cannot read checkpoint '{ckpt_dir}' (truncated or damaged?): {last_line(e)}") from None
    sd = torch.load(full, map_location="cpu", weights_only=True)
    full.unlink()
    write_atomic(out / CONSOLIDATED, lambda tmp: torch.save({"model": sd["model"]}, tmp))
    if (src / "params.json").is_file():
        shutil.copy(src / "params.json", out / "params.json")
    return out / CONSOLIDATED


@exit_on_error
def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] != "consolidate":
        raise ConfigError("usage: python -m lingua.checkpoint consolidate <ckpt_dir> <out_dir>")
    print(f"wrote {consolidate(argv[1], argv[2])}")


if __name__ == "__main__":
    main(sys.argv[1:])
