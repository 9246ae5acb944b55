"""Load a trained model for evaluation or generation: weights, model args and tokenizer from one directory.

    model, model_args, tokenizer = load_model("runs/debug/checkpoints/0000001000")

Accepted directories:
- a DCP checkpoint (`.metadata`, `*.distcp`, `params.json`), as training writes them;
- a consolidated one (`consolidated.pth` + `params.json`, from `python -m lingua.checkpoint consolidate`);
- a Hugging Face Llama directory (`config.json` + `*.safetensors`; needs the `hf` extra): model args from config.json,
  the tokenizer from a sentencepiece `tokenizer.model` in the directory (or the bytes tokenizer `export_hf` writes),
  else from `tokenizer.path=`;
- a run directory or its `checkpoints/` folder: its latest complete checkpoint.

The tokenizer named in params.json (`data.tokenizer`) can be overridden (a run moved to another machine, say). Each
process loads the whole model, so this works unchanged on every rank under torchrun.
"""

import dataclasses
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from lingua.checkpoint import CONSOLIDATED, list_checkpoints, load_model_weights
from lingua.distributed import pick_device as _pick_device
from lingua.errors import LinguaError
from lingua.precision import DTYPES
from lingua.tokenizer import build_tokenizer, check_vocab_size
from lingua.transformer import Transformer, TransformerArgs, build_model

logger = logging.getLogger(__name__)


@dataclass
class TokenizerOverride:
    name: Optional[str] = None  # bytes | sp | tiktoken; None: the checkpoint's (or guessed from the path)
    path: Optional[str] = None  # None: the checkpoint's (params.json) or the HF dir's tokenizer.model


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
    try:
        params = json.loads(path.read_text())
    except ValueError as e:
        raise LinguaError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        raise LinguaError(f"{path} has no 'model' section")
    return params


def model_args_from_params(params: dict, where, args_cls=TransformerArgs):
    known = {f.name for f in dataclasses.fields(args_cls)}
    unknown = sorted(set(params["model"]) - known)
    if unknown:
        raise LinguaError(f"{where}: model.{unknown[0]} is not a {args_cls.__name__} field "
                          "(a checkpoint of another model?)")
    return args_cls(**params["model"])


def _guess_tokenizer_name(path: str) -> str:
    return "tiktoken" if path.endswith(".tiktoken") else "sp"


def resolve_tokenizer(ckpt_dir: Path, kind: str, params: Optional[dict], override: TokenizerOverride):
    """The tokenizer for this checkpoint: `override.path` wins (its name guessed from the extension unless given),
    then a HF directory's own (tokenizer.model, or the bytes tokenizer export_hf writes), then params.json's."""
    if override.path:
        name, path, source = override.name or _guess_tokenizer_name(override.path), override.path, "tokenizer.path"
    elif kind == "hf" and override.name != "bytes":
        from lingua.hf import hf_tokenizer

        found = hf_tokenizer(ckpt_dir)  # a sentencepiece tokenizer.model, or the bytes tokenizer export_hf writes
        if found is None:
            raise LinguaError(f"'{ckpt_dir}' has no tokenizer lingua can read (a sentencepiece tokenizer.model): "
                              "pass tokenizer.path=<file> (and tokenizer.name=sp|tiktoken)")
        name, path, source = found[0], found[1], str(ckpt_dir)
    else:
        saved = ((params or {}).get("data") or {}).get("tokenizer") or {}
        name, path = override.name or saved.get("name") or "bytes", saved.get("path")
        source = f"{ckpt_dir}/params.json (data.tokenizer.path)"
    if name != "bytes" and path and not Path(path).is_file():
        raise LinguaError(f"tokenizer file '{path}' from {source} not found: pass tokenizer.path=<file>")
    return build_tokenizer(name, path)


def load_model(ckpt_dir: str, device="cpu", dtype=None, tokenizer: Optional[TokenizerOverride] = None,
               model_cls=Transformer, args_cls=TransformerArgs):
    """-> (model in eval mode on `device`, model args, tokenizer). dtype: None/'fp32', 'bf16' or a torch.dtype
    (the RoPE tables stay fp32). Apps with other architectures pass their model class and its args dataclass."""
    path, kind = checkpoint_kind(ckpt_dir)
    params = None
    if kind == "hf":
        from lingua.hf import model_args_from_hf  # the optional hf extra, only for HF directories

        model_args = model_args_from_hf(path)
    else:
        params = read_params(path)
        model_args = model_args_from_params(params, path / "params.json", args_cls)
    tok = resolve_tokenizer(path, kind, params, tokenizer or TokenizerOverride())
    check_vocab_size(tok, model_args.vocab_size)
    if model_cls is Transformer:
        model = build_model(model_args, device)  # the random init is overwritten just below
    else:
        with torch.device("meta"):
            model = model_cls(model_args)
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()
    with warnings.catch_warnings():  # DCP's "assuming the intent is to load in a single process" is expected here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_model_weights(str(path), model)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LinguaError(f"dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype != torch.float32:
        fp32_buffers = {n: b for n, b in model.named_buffers() if n in ("freq_cos", "freq_sin")}
        model.to(dtype)
        for n, b in fp32_buffers.items():
            setattr(model, n, b)  # positions need fp32 angles
    logger.info(f"loaded {kind} checkpoint {path} on {device}")
    return model.eval(), model_args, tok


def pick_device(requested: str = "auto") -> torch.device:
    """auto: this rank's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    return _pick_device(requested, int(os.environ.get("LOCAL_RANK", 0)))
