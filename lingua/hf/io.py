"""Hugging Face interoperability, whatever the architecture: write a model as a transformers directory
(model.safetensors, config.json, tokenizer files) and read one back. What is architecture-specific, the parameter
names, layouts and config.json fields, is an `HFMapping` in the model's ModelSpec (`spec.hf`, in order of preference:
the transformer's are lingua/models/transformer/hf_*.py). Export takes the first mapping that computes the model
exactly (lingua.hf.mapping.choose); lingua's own class comes with its code (lingua/hf/remote/, `auto_map`).

    export_hf(spec.hf, model.state_dict(), args, out_dir, "sp", "tok.model")
    load_hf_weights(hf_dir, model, spec.hf)

safetensors, tokenizers and transformers (the optional `hf` extra) are imported only when used.
"""

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lingua.errors import LinguaError, require
from lingua.files import write_atomic, write_json_atomic
from lingua.hf.mapping import Mappings, choose, for_model_type

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
REMOTE_CODE = Path(__file__).parent / "remote"  # package data: lingua's transformers classes, copied into exports


def read_config(path) -> tuple[Path, dict]:
    """(config.json's path, its content) of a Hugging Face directory (or the file itself)."""
    p = Path(path)
    cfg_path = p if p.is_file() else p / "config.json"
    if not cfg_path.is_file():
        raise LinguaError(f"'{path}' is not a Hugging Face model directory (no config.json)")
    try:
        return cfg_path, json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise LinguaError(f"cannot read {cfg_path}: {e}") from None


# ---------------------------------------------------------------- export


def _tokenizer_files(out: Path, name: str, path: Optional[str]):
    """Write what `AutoTokenizer.from_pretrained(out)` needs; return (bos_id, eos_id)."""
    from lingua.data.tokenizer import build_tokenizer

    tok = build_tokenizer(name, path)
    if name == "sp":
        # our sentencepiece models use identity normalisation and no dummy prefix (setup/train_tokenizer.py), so no
        # prefix space here; transformers builds its fast tokenizer from tokenizer.model (needs protobuf)
        sp = tok.sp
        proto_prefix, normalizer = _sp_settings(path)
        if normalizer not in ("identity", None):
            logger.warning(f"sentencepiece model {path} normalises text ({normalizer}); the Hugging Face tokenizer "
                           "does not, so its ids can differ on text that normalisation changes")
        shutil.copyfile(path, out / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": sp.id_to_piece(tok.bos_id),
            "eos_token": sp.id_to_piece(tok.eos_id),
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "add_bos_token": True,  # transformers 5 adds none unless told; lingua trains with BOS first
            "add_eos_token": False,
            "add_prefix_space": proto_prefix,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,  # like lingua, read the text "<s>" as text, never as a control token
        }
        write_json_atomic(out / "tokenizer_config.json", config, indent=2)
        try:
            import transformers
        except ImportError:  # AutoTokenizer converts tokenizer.model when it loads the directory
            logger.info("transformers is not installed: wrote tokenizer.model without tokenizer.json")
        else:  # the converted fast tokenizer too, for loaders without sentencepiece/protobuf
            transformers.AutoTokenizer.from_pretrained(str(out)).backend_tokenizer.save(str(out / "tokenizer.json"))
    elif name == "bytes":
        _write_bytes_tokenizer(out, tok)
    else:
        logger.warning(f"tokenizer '{name}' has no Hugging Face equivalent here: exported the model without it")
    return tok.bos_id, tok.eos_id


def _sp_settings(path: str) -> tuple[bool, Optional[str]]:
    """(add_dummy_prefix, normalization rule name) of a sentencepiece model; (False, None) without protobuf, which
    is what setup/train_tokenizer.py models use."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

        proto = pb.ModelProto()
        proto.ParseFromString(Path(path).read_bytes())
        return bool(proto.normalizer_spec.add_dummy_prefix), proto.normalizer_spec.name or None
    except Exception:
        return False, None


def _write_bytes_tokenizer(out: Path, tok) -> None:
    """lingua's bytes tokenizer as a `tokenizers` BPE with no merges: every UTF-8 byte falls back to `<0xXX>` (ids
    0-255), then `<s>` (256) and `</s>` (257)."""
    tokenizers = require("tokenizers", "hf")
    from tokenizers.models import BPE

    from tokenizers import decoders, processors

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"<s>": tok.bos_id, "</s>": tok.eos_id})
    t = tokenizers.Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True))
    t.add_special_tokens([tokenizers.AddedToken("<s>", special=True), tokenizers.AddedToken("</s>", special=True)])
    t.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", tok.bos_id)])
    t.save(str(out / "tokenizer.json"))
    write_json_atomic(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # like lingua, read the text "<s>" as its three bytes
    }, indent=2)


def hf_tokenizer(path) -> Optional[tuple[str, Optional[str]]]:
    """(name, path) for `lingua.data.tokenizer.build_tokenizer` of the tokenizer in a Hugging Face directory:
    ("sp", <dir>/tokenizer.model), ("bytes", None) for a bytes tokenizer `export_hf` wrote, else None."""
    p = Path(path)
    if (p / "tokenizer.model").is_file():
        return "sp", str(p / "tokenizer.model")
    try:
        model = json.loads((p / "tokenizer.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    bytes_vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"<s>": 256, "</s>": 257}
    if model.get("type") == "BPE" and model.get("vocab") == bytes_vocab and not model.get("merges"):
        return "bytes", None
    return None


def export_hf(mappings: Mappings, model_state: dict, args, out_dir, tokenizer_name: Optional[str] = None,
              tokenizer_path: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write `out_dir/` as a Hugging Face model: model.safetensors, config.json, the class's code when it is lingua's
    own and, where the tokenizer has a Hugging Face form (sentencepiece, bytes), its files. `mappings`: the
    ModelSpec's `hf`; the first that computes the model exactly is taken. `dtype` None keeps the weights' own."""
    mapping = choose(mappings, args)
    save_file = require("safetensors.torch", "hf").save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = mapping.to_hf(model_state, args)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    weights_dtype = next(iter(tensors.values())).dtype
    bos_id = eos_id = None
    if tokenizer_name:
        bos_id, eos_id = _tokenizer_files(out, tokenizer_name, tokenizer_path)
    for src in sorted(REMOTE_CODE.glob("*.py")):  # a native class: no stale code of an earlier export left beside it
        if mapping.remote_code:
            write_atomic(out / src.name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        else:
            (out / src.name).unlink(missing_ok=True)
    write_atomic(out / WEIGHTS, lambda tmp: save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp),
                                                      metadata={"format": "pt"}))
    write_json_atomic(out / "config.json", mapping.config(args, bos_id, eos_id, weights_dtype), indent=2)
    return out


# ---------------------------------------------------------------- import


def read_hf_tensors(path) -> dict:
    """Every tensor of the *.safetensors files in a Hugging Face directory (one file or shards), on CPU."""
    load_file = require("safetensors.torch", "hf").load_file
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise LinguaError(f"'{path}' has no *.safetensors weights")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f), device="cpu"))
    return tensors


def hf_model_type(path) -> str:
    cfg_path, cfg = read_config(path)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise LinguaError(f"{cfg_path} has no model_type")
    return model_type


def args_from_hf(path, mappings: Mappings):
    """The model args of the Hugging Face model in `path` under the mapping for its model_type, or one line saying
    why they don't fit."""
    cfg_path, cfg = read_config(path)
    archs = ", ".join(cfg.get("architectures") or []) or "no architectures"
    mapping = for_model_type(mappings, cfg.get("model_type"), f"{cfg_path} ({archs})")
    return mapping.args_from_config(cfg_path, cfg)


def load_hf_weights(path, model: nn.Module, mappings: Mappings) -> None:
    """Load a Hugging Face directory's weights into our model, plain or FSDP/TP-sharded (each rank reads the files
    and keeps its own shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    args = getattr(model, "args", None)
    if not mappings or args is None:
        raise LinguaError(f"cannot load Hugging Face weights '{path}' into {type(model).__name__}: it has no Hugging "
                          "Face mapping")
    mapping = for_model_type(mappings, hf_model_type(path), f"{path}/config.json")
    mapping.check_matches(mapping.args_from_config(*read_config(path)), args, path)
    sd = mapping.from_hf(read_hf_tensors(path), args)
    current = model.state_dict()
    sd = {k: v.to(current[k].dtype) for k, v in sd.items() if k in current}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
