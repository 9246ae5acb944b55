"""Export a checkpoint as a Hugging Face Llama directory:

    python -m apps.main.export_hf ckpt_dir=<dump_dir>/checkpoints/0000001000 out=<dir> [dtype=bf16]

`ckpt_dir` is a DCP checkpoint, a consolidated one (`python -m lingua.checkpoint consolidate`) or a run directory
(its latest checkpoint); the checkpoint's params.json gives the model args and the tokenizer. The result loads with
`transformers.AutoModelForCausalLM.from_pretrained(out)`, and with `AutoTokenizer` for sentencepiece and bytes
tokenizers (tiktoken ones are left out). Needs the `hf` extra.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lingua.args import run_cli
from lingua.checkpoint import load_model_weights
from lingua.errors import ConfigError, LinguaError
from lingua.hf import export_hf
from lingua.inference import checkpoint_kind, model_args_from_params, read_params
from lingua.transformer import build_model, num_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportArgs:
    ckpt_dir: str = ""
    out: str = ""
    dtype: Optional[str] = None  # fp32 | bf16 | fp16; null keeps the checkpoint's
    tokenizer_name: Optional[str] = None  # default: the run's data.tokenizer.name
    tokenizer_path: Optional[str] = None  # default: the run's data.tokenizer.path


def main(args: ExportArgs) -> Path:
    if not args.ckpt_dir or not args.out:
        raise ConfigError("give ckpt_dir=<checkpoint dir> and out=<output dir>")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ConfigError(f"dtype={args.dtype!r} is not one of {', '.join(DTYPES)}")
    ckpt, kind = checkpoint_kind(args.ckpt_dir)
    if kind == "hf":
        raise LinguaError(f"'{ckpt}' is already a Hugging Face directory")
    params = read_params(ckpt)
    model_args = model_args_from_params(params, ckpt / "params.json")
    tokenizer = (params.get("data") or {}).get("tokenizer") or {}
    tok_name = args.tokenizer_name or tokenizer.get("name")
    tok_path = args.tokenizer_path or tokenizer.get("path")
    if tok_name not in (None, "bytes") and tok_path and not Path(tok_path).is_file():
        raise LinguaError(f"tokenizer file '{tok_path}' (data.tokenizer.path of the run) not found: "
                          "pass tokenizer_path=<file>")

    model = build_model(model_args, "cpu")  # initialised, then overwritten by the checkpoint
    load_model_weights(str(ckpt), model)
    out = export_hf(model.state_dict(), model_args, args.out, tok_name, tok_path,
                    dtype=DTYPES[args.dtype] if args.dtype else None)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"exported {ckpt} ({num_params(model) / 1e6:.2f}M parameters) to {out}: {files}")
    return out


if __name__ == "__main__":
    run_cli(main, ExportArgs)
