"""Hugging Face interoperability: export our Transformer as a `LlamaForCausalLM` directory, and load one back.

    export_hf(model_state, args, out_dir, "sp", "tok.model")   # model.safetensors, config.json, tokenizer files
    args = model_args_from_hf(hf_dir); load_hf_weights(hf_dir, model)

The two models compute the same function; only names and one layout differ:

- Names: `layers.{i}.attention.wq.weight` <-> `model.layers.{i}.self_attn.q_proj.weight`, and so on (`HF_LAYER_NAMES`).
- RoPE: we rotate interleaved pairs (dims 2i, 2i+1 of each head share angle i, as Meta's Llama code does);
  transformers' `rotate_half` rotates the halves (dims i and i + head_dim/2 share angle i). Attention scores are
  q.k summed over a head's dims, so permuting the output rows of wq and wk the same way inside every head changes
  nothing but the layout: row 2i+j of a head (ours) becomes row j*head_dim/2 + i (theirs). wv, wo are untouched.
- Tied embeddings: `lm_head.weight` is omitted from the file and `tie_word_embeddings` is set, as transformers saves it.

safetensors, tokenizers and transformers (the optional `hf` extra) are imported only when used.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lingua.errors import LinguaError, require
from lingua.transformer import TransformerArgs, check_args, ffn_hidden_dim

logger = logging.getLogger(__name__)

# ours -> theirs, for the parameters of block i (prefixes `layers.{i}.` and `model.layers.{i}.` added around them)
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
WEIGHTS = "model.safetensors"


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face Llama one."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}"
    if name in HF_NAMES:
        return HF_NAMES[name]
    raise LinguaError(f"parameter '{name}' has no Hugging Face Llama equivalent")


def _expected_names(args: TransformerArgs) -> list[str]:
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    return names + [f"layers.{i}.{k}" for i in range(args.n_layers) for k in HF_LAYER_NAMES]


# ---------------------------------------------------------------- the RoPE layout


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads * head_dim, dim): pairs (2i, 2i+1) of each head -> (i, i + head_dim/2)."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim).contiguous()


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_halves`."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim).contiguous()


# ---------------------------------------------------------------- state dicts


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP/TP shard) -> the whole tensor


def to_hf_state_dict(model_state: dict, args: TransformerArgs) -> dict:
    """Our state dict (full tensors or DTensors) -> Hugging Face Llama names and RoPE layout. Tied embeddings: no
    `lm_head.weight` (safetensors refuses two names for one storage). Tensors other than wq/wk may share memory
    with `model_state`."""
    n_heads, n_kv_heads, _ = check_args(args)
    expected = _expected_names(args)
    if args.weight_tying:
        expected.remove("output.weight")
    for name in expected:
        if name not in model_state:
            raise LinguaError(f"model state has no '{name}': it is not a {args.n_layers}-layer lingua Transformer")
    hf = {}
    for name in expected:
        w = _full(model_state[name]).detach()
        if name.endswith("attention.wq.weight"):
            w = interleaved_to_halves(w, n_heads)
        elif name.endswith("attention.wk.weight"):
            w = interleaved_to_halves(w, n_kv_heads)
        hf[hf_name(name)] = w.contiguous()
    return hf


def from_hf_state_dict(hf_state: dict, args: TransformerArgs) -> dict:
    """Hugging Face Llama tensors -> our names and RoPE layout (the exact inverse of `to_hf_state_dict`).

    A checkpoint without `lm_head.weight` has tied embeddings: `output.weight` is then the embedding table."""
    n_heads, n_kv_heads, _ = check_args(args)
    theirs_to_ours = {hf_name(n): n for n in _expected_names(args)}
    ours = {}
    for key, w in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; we derive it from rope_theta
        if key not in theirs_to_ours:
            raise LinguaError(f"Hugging Face tensor '{key}' has no place in a {args.n_layers}-layer lingua Transformer")
        name = theirs_to_ours[key]
        if name.endswith("attention.wq.weight"):
            w = halves_to_interleaved(w, n_heads)
        elif name.endswith("attention.wk.weight"):
            w = halves_to_interleaved(w, n_kv_heads)
        ours[name] = w
    if "output.weight" not in ours and "tok_embeddings.weight" in ours:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    for name in _expected_names(args):
        if name not in ours:
            raise LinguaError(f"Hugging Face checkpoint has no '{hf_name(name)}'")
    return ours


# ---------------------------------------------------------------- config.json


def hf_config(args: TransformerArgs, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """The `LlamaConfig` fields of a model built from `args`, as transformers writes them to config.json.

    RoPE theta is written both ways: `rope_parameters` (transformers >= 5) and `rope_theta` (4.x)."""
    n_heads, n_kv_heads, head_dim = check_args(args)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rope_theta)},
        "rope_theta": float(args.rope_theta),
        "max_position_embeddings": args.max_seqlen,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": bool(args.weight_tying),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_base_std or args.dim**-0.5,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),  # the name transformers 4.x reads
    }


def _ffn_args(dim: int, intermediate_size: int) -> tuple[Optional[float], int]:
    """(ffn_dim_multiplier, multiple_of) that make our FeedForward exactly `intermediate_size` wide."""
    for multiple_of in (256, 1024, 128, 64, 32, 16, 8):  # the defaults Llama configs use, when they fit
        if ffn_hidden_dim(dim, multiple_of, None) == intermediate_size:
            return None, multiple_of
    # Otherwise round up to intermediate_size itself, scaling down first if the default is wider: int(multiplier *
    # base) lands on intermediate_size or one below it, which rounds up to exactly intermediate_size.
    base = int(2 * 4 * dim / 3)
    multiplier = None if base <= intermediate_size else intermediate_size / base
    if ffn_hidden_dim(dim, intermediate_size, multiplier) != intermediate_size:
        raise LinguaError(f"cannot express intermediate_size={intermediate_size} for hidden_size={dim}")
    return multiplier, intermediate_size


def _read_config(path) -> tuple[Path, dict]:
    p = Path(path)
    cfg_path = p if p.is_file() else p / "config.json"
    if not cfg_path.is_file():
        raise LinguaError(f"'{path}' is not a Hugging Face model directory (no config.json)")
    try:
        return cfg_path, json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise LinguaError(f"cannot read {cfg_path}: {e}") from None


def model_args_from_hf(path) -> TransformerArgs:
    """TransformerArgs for the Llama model in a Hugging Face directory (or its config.json), or one line saying why
    it cannot be represented."""
    cfg_path, cfg = _read_config(path)
    model_type = cfg.get("model_type")
    if model_type != "llama":
        archs = ", ".join(cfg.get("architectures") or []) or "no architectures"
        raise LinguaError(f"{cfg_path}: model_type '{model_type}' ({archs}) is not supported, only Llama ('llama')")
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if cfg.get("rope_scaling") or rope_type != "default":
        raise LinguaError(f"{cfg_path}: RoPE scaling ({cfg.get('rope_scaling') or rope}) is not supported")
    if cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LinguaError(f"{cfg_path}: partial_rotary_factor != 1 is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise LinguaError(f"{cfg_path}: {key}=true is not supported (lingua's linear layers have no bias)")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise LinguaError(f"{cfg_path}: hidden_act '{cfg['hidden_act']}' is not supported (lingua uses SwiGLU: silu)")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        multiplier, multiple_of = _ffn_args(dim, int(cfg["intermediate_size"]))
        return TransformerArgs(
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            ffn_dim_multiplier=multiplier,
            multiple_of=multiple_of,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_seqlen=int(cfg.get("max_position_embeddings", 2048)),
            vocab_size=int(cfg["vocab_size"]),
            weight_tying=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise LinguaError(f"{cfg_path}: missing {e.args[0]}") from None


# ---------------------------------------------------------------- export


def _tokenizer_files(out: Path, name: str, path: Optional[str]):
    """Write what `AutoTokenizer.from_pretrained(out)` needs; return (bos_id, eos_id)."""
    from lingua.tokenizer import build_tokenizer

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
        _write_json(out / "tokenizer_config.json", config)
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
    from tokenizers import decoders, processors
    from tokenizers.models import BPE

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"<s>": tok.bos_id, "</s>": tok.eos_id})
    t = tokenizers.Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True))
    t.add_special_tokens([tokenizers.AddedToken("<s>", special=True), tokenizers.AddedToken("</s>", special=True)])
    t.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", tok.bos_id)])
    t.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # like lingua, read the text "<s>" as its three bytes
    })


def hf_tokenizer(path) -> Optional[tuple[str, Optional[str]]]:
    """(name, path) for `lingua.tokenizer.build_tokenizer` of the tokenizer in a Hugging Face directory:
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


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def export_hf(model_state: dict, args: TransformerArgs, out_dir, tokenizer_name: Optional[str] = None,
              tokenizer_path: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write `out_dir/` as a Hugging Face Llama model: model.safetensors, config.json and, where the tokenizer has a
    Hugging Face form (sentencepiece, bytes), its files. `dtype` None keeps the weights' own dtype."""
    save_file = require("safetensors.torch", "hf").save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model_state, args)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    weights_dtype = next(iter(tensors.values())).dtype
    bos_id = eos_id = None
    if tokenizer_name:
        bos_id, eos_id = _tokenizer_files(out, tokenizer_name, tokenizer_path)
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    _write_json(out / "config.json", hf_config(args, bos_id, eos_id, weights_dtype))
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


def _check_matches(hf_args: TransformerArgs, args: TransformerArgs, path) -> None:
    """Fail on a different shape or head layout (the RoPE permutation depends on it); warn on what only changes
    numerics (rope_theta, norm_eps, max_seqlen), which a fine-tuning run may change on purpose."""
    theirs, ours = check_args(hf_args), check_args(args)
    shape_keys = {"model.dim": (hf_args.dim, args.dim), "model.n_layers": (hf_args.n_layers, args.n_layers),
                  "model.vocab_size": (hf_args.vocab_size, args.vocab_size),
                  "model.n_heads": (theirs[0], ours[0]), "model.n_kv_heads": (theirs[1], ours[1]),
                  "model.head_dim": (theirs[2], ours[2]),
                  "FFN width": (ffn_hidden_dim(hf_args.dim, hf_args.multiple_of, hf_args.ffn_dim_multiplier),
                                ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier))}
    for key, (h, o) in shape_keys.items():
        if h != o:
            raise LinguaError(f"Hugging Face model '{path}' has {key}={h} but this model has {o}")
    for key in ("rope_theta", "norm_eps", "max_seqlen"):
        if getattr(hf_args, key) != getattr(args, key):
            logger.warning(f"Hugging Face model '{path}' has {key}={getattr(hf_args, key)}, this model "
                           f"model.{key}={getattr(args, key)}: its outputs will differ from the original's")


def load_hf_weights(path, model: nn.Module) -> None:
    """Load a Hugging Face Llama directory's weights into our Transformer, plain or FSDP/TP-sharded (each rank reads
    the files and keeps its own shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    args = getattr(model, "args", None)
    if not isinstance(args, TransformerArgs):
        raise LinguaError(f"cannot load Hugging Face weights '{path}' into {type(model).__name__}: "
                          "not a lingua Transformer")
    _check_matches(model_args_from_hf(path), args, path)
    sd = from_hf_state_dict(read_hf_tensors(path), args)
    current = model.state_dict()
    sd = {k: v.to(current[k].dtype) for k, v in sd.items() if k in current}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
