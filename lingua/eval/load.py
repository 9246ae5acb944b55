"""Load a trained model for evaluation or generation: weights, model args and tokenizer from one directory.

    model, model_args, tokenizer = load_model("runs/debug/checkpoints/0000001000")

Accepted directories:
- a DCP checkpoint (`.metadata`, `*.distcp`, `params.json`), as training writes them;
- a consolidated one (`consolidated.pth` + `params.json`, from `python -m lingua.checkpoint consolidate`);
- a Hugging Face directory (`config.json` + `*.safetensors`; needs the `hf` extra) of a model_type a built-in spec
  maps (Llama): model args from config.json, the tokenizer from a sentencepiece `tokenizer.model` in the directory
  (or the bytes tokenizer `export_hf` writes), else from `tokenizer.path=`;
- a run directory or its `checkpoints/` folder: its latest complete checkpoint.

Which architecture to build comes from the checkpoint: params.json's `model_spec` (lingua.models.spec), or config.json's
model_type. The tokenizer named in params.json (`data.tokenizer`) can be overridden (a run moved to another machine,
say). Each process loads the whole model, so this works unchanged on every rank under torchrun.
"""

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from lingua.checkpoint.integrity import file_sha256
from lingua.checkpoint.manager import list_checkpoints
from lingua.checkpoint.weights import CONSOLIDATED, load_model_weights
from lingua.data.tokenizer import build_tokenizer, check_vocab_size
from lingua.distributed.mesh import pick_device as _pick_device
from lingua.distributed.precision import cpu_name, inference_dtype, parse_dtype
from lingua.errors import LinguaError
from lingua.files import read_json
from lingua.hf.io import args_from_hf, hf_model_type, hf_tokenizer
from lingua.kernels.attention import Placement, place_attention
from lingua.models.decoder import materialize
from lingua.models.spec import (
    ModelSpec,
    model_args_from_params,
    spec_for_hf,
    spec_for_params,
)

logger = logging.getLogger(__name__)


@dataclass
class TokenizerOverride:
    name: Optional[str] = None  # bytes | sp | tiktoken; None: the checkpoint's (or guessed from the path)
    path: Optional[str] = None  # None: the checkpoint's (params.json) or the HF dir's tokenizer.model
    force: bool = False  # use name/path even when they are not the tokenizer the checkpoint was trained with


def checkpoint_kind(path: Union[str, Path]) -> tuple[Path, str]:
    """(the checkpoint directory, 'dcp' | 'consolidated' | 'hf'); a run dir resolves to its latest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise LinguaError(f"checkpoint path '{path}' does not exist")
    if not p.is_dir():
        raise LinguaError(f"checkpoint path '{path}' is a file; give its directory")
    if (p / CONSOLIDATED).is_file():
        return p, "consolidated"
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return p, "hf"
    if (p / ".metadata").is_file():
        return p, "dcp"
    for folder in (p / "checkpoints", p):
        done = list_checkpoints(folder)
        if done:
            logger.info(f"using the latest checkpoint of {path}: {done[-1]}")
            return done[-1], "dcp"
    raise LinguaError(f"'{path}' is not a checkpoint: expected a DCP dir (.metadata), a consolidated dir "
                      f"({CONSOLIDATED}), a Hugging Face dir (config.json + *.safetensors) "
                      "or a run dir with checkpoints/")


def read_params(ckpt_dir: Path) -> dict:
    """The training config saved next to a lingua checkpoint."""
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise LinguaError(f"checkpoint '{ckpt_dir}' has no params.json: the model's shape is unknown")
    params = read_json(path)
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        raise LinguaError(f"{path} is not valid JSON with a 'model' section")
    return params


@dataclass
class Checkpoint:
    """What a checkpoint directory says about the model in it, before any weight is read."""

    path: Path
    kind: str  # dcp | consolidated | hf
    spec: ModelSpec
    model_args: object
    params: dict  # params.json ({} for a Hugging Face directory)


def inspect_checkpoint(ckpt_dir) -> Checkpoint:
    path, kind = checkpoint_kind(ckpt_dir)
    if kind == "hf":
        spec = spec_for_hf(hf_model_type(path), path / "config.json")
        return Checkpoint(path, kind, spec, args_from_hf(path, spec.hf), {})
    params = read_params(path)
    spec = spec_for_params(params, path / "params.json")
    return Checkpoint(path, kind, spec, model_args_from_params(params, spec, path / "params.json"), params)


def _guess_tokenizer_name(path: str) -> str:
    return "tiktoken" if path.endswith(".tiktoken") else "sp"


def resolve_tokenizer(ckpt: Checkpoint, override: TokenizerOverride):
    """The tokenizer for this checkpoint: `override.path` wins (its name guessed from the extension unless given),
    then a HF directory's own (tokenizer.model, or the bytes tokenizer export_hf writes), then params.json's."""
    if override.path:
        name, path, source = override.name or _guess_tokenizer_name(override.path), override.path, "tokenizer.path"
    elif ckpt.kind == "hf" and override.name != "bytes":
        found = hf_tokenizer(ckpt.path)  # a sentencepiece tokenizer.model, or the bytes tokenizer export_hf writes
        if found is None:
            raise LinguaError(f"'{ckpt.path}' has no tokenizer lingua can read (a sentencepiece tokenizer.model): "
                              "pass tokenizer.path=<file> (and tokenizer.name=sp|tiktoken)")
        name, path, source = found[0], found[1], str(ckpt.path)
    else:
        saved = (ckpt.params.get("data") or {}).get("tokenizer") or {}
        name, path = override.name or saved.get("name") or "bytes", saved.get("path")
        source = f"{ckpt.path}/params.json (data.tokenizer.path)"
    if name != "bytes" and path and not Path(path).is_file():
        raise LinguaError(f"tokenizer file '{path}' from {source} not found: pass tokenizer.path=<file>")
    if ckpt.kind != "hf" and (override.name or override.path) and not override.force:
        _check_same_tokenizer(ckpt, name, path)
    return build_tokenizer(name, path)


def _check_same_tokenizer(ckpt: Checkpoint, name: str, path: Optional[str]) -> None:
    """Another tokenizer than the one a checkpoint trained with gives plausible-looking nonsense (bpb, garbage
    text): refuse a different kind or file content; the same file moved elsewhere is fine."""
    saved = (ckpt.params.get("data") or {}).get("tokenizer") or {}
    saved_name, saved_path = saved.get("name") or "bytes", saved.get("path")
    differs = name != saved_name
    if not differs and name != "bytes" and saved_path and Path(saved_path).is_file() and path:
        differs = file_sha256(Path(saved_path)) != file_sha256(Path(path))
    if differs:
        shown = f" ({path})" if path and name != "bytes" else ""
        raise LinguaError(f"tokenizer '{name}'{shown} is not the one {ckpt.path}/params.json "
                          f"trained with ('{saved_name}'{f' ({saved_path})' if saved_path else ''}): pass "
                          "tokenizer.force=true to use it anyway")


def build_for_checkpoint(ckpt: Checkpoint, device="cpu") -> torch.nn.Module:
    """The checkpoint's model with its weights, on `device`, in eval mode."""
    with torch.device("meta"):
        model = ckpt.spec.build(ckpt.model_args)
    materialize(model, device)  # no random init: every weight is read next
    with warnings.catch_warnings():  # DCP's "assuming the intent is to load in a single process" is expected here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_model_weights(str(ckpt.path), model, ckpt.spec.hf)
    return model.eval()


def load_model(ckpt_dir, device="cpu", dtype=None, tokenizer: Optional[TokenizerOverride] = None):
    """-> (model in eval mode on `device`, model args, tokenizer). ckpt_dir: a directory or an `inspect_checkpoint`
    result. dtype: None/'fp32', 'bf16', 'auto' (bf16 on CUDA, else fp32) or a torch.dtype (buffers such as RoPE tables
    stay fp32)."""
    ckpt = ckpt_dir if isinstance(ckpt_dir, Checkpoint) else inspect_checkpoint(ckpt_dir)
    tok = resolve_tokenizer(ckpt, tokenizer or TokenizerOverride())
    check_vocab_size(tok, ckpt.model_args.vocab_size)
    model = build_for_checkpoint(ckpt, device)
    dtype = inference_dtype(dtype, device) if dtype == "auto" else parse_dtype(dtype) if dtype is not None else torch.float32
    if dtype != torch.float32:
        for p in model.parameters():  # parameters only: buffers (RoPE angles) need fp32
            p.data = p.data.to(dtype)
    # the attention kernel for this device, as training chooses it (flex for block_causal on CUDA), no compile
    place_attention(model, ckpt.model_args, Placement(torch.device(device).type, dtype, False, machine=cpu_name()),
                    batch=1, seqlen=ckpt.model_args.max_seqlen)
    logger.info(f"loaded {ckpt.kind} {ckpt.spec.name} checkpoint {ckpt.path} on {device}")
    return model, ckpt.model_args, tok


def pick_device(requested: str = "auto") -> torch.device:
    """auto: this rank's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    return _pick_device(requested, int(os.environ.get("LOCAL_RANK", 0)))
