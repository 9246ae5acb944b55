"""Export a checkpoint as a Hugging Face directory, for any architecture whose ModelSpec has HF mappings: the first
native transformers class that computes the model exactly (the transformer: Llama, Qwen3, Arcee), else lingua's own
class as remote code (`trust_remote_code=True`); the log says which and why.

    python -m apps.main.export_hf ckpt_dir=<dump_dir>/checkpoints/0000001000 out=<dir> [dtype=bf16]

`ckpt_dir` is a DCP checkpoint, a consolidated one (`python -m lingua.checkpoint consolidate`) or a run directory
(its latest checkpoint); the checkpoint's params.json gives the model args and the tokenizer. The result loads with
`transformers.AutoModelForCausalLM.from_pretrained(out)` (plus `trust_remote_code=True` for lingua's class), and
with `AutoTokenizer` for sentencepiece and bytes tokenizers (tiktoken ones are left out). Needs the `hf` extra.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lingua.args import run_cli
from lingua.distributed.precision import parse_dtype
from lingua.errors import ConfigError, LinguaError
from lingua.eval.load import build_for_checkpoint, inspect_checkpoint
from lingua.hf.io import export_hf
from lingua.log import setup_logging
from lingua.models.decoder import num_params


@dataclass
class ExportArgs:
    ckpt_dir: str = ""  # the lingua checkpoint to export
    out: str = ""  # the Hugging Face folder to write (config.json, model.safetensors, tokenizer)
    dtype: Optional[str] = None  # fp32 | bf16 | fp16; null keeps the checkpoint's
    tokenizer_name: Optional[str] = None  # default: the run's data.tokenizer.name
    tokenizer_path: Optional[str] = None  # default: the run's data.tokenizer.path


def main(args: ExportArgs) -> Path:
    if not args.ckpt_dir or not args.out:
        raise ConfigError("give ckpt_dir=<checkpoint dir> and out=<output dir>")
    dtype = parse_dtype(args.dtype) if args.dtype is not None else None
    ckpt = inspect_checkpoint(args.ckpt_dir)
    if ckpt.kind == "hf":
        raise LinguaError(f"'{ckpt.path}' is already a Hugging Face directory")
    if not ckpt.spec.hf:
        raise LinguaError(f"'{ckpt.path}' holds a {ckpt.spec.name} model, which has no Hugging Face equivalent")
    tokenizer = (ckpt.params.get("data") or {}).get("tokenizer") or {}
    tok_name = args.tokenizer_name or tokenizer.get("name")
    tok_path = args.tokenizer_path or tokenizer.get("path")
    if tok_name not in (None, "bytes") and tok_path and not Path(tok_path).is_file():
        raise LinguaError(f"tokenizer file '{tok_path}' (data.tokenizer.path of the run) not found: "
                          "pass tokenizer_path=<file>")

    model = build_for_checkpoint(ckpt, "cpu")
    out = export_hf(ckpt.spec.hf, model.state_dict(), ckpt.model_args, args.out, tok_name, tok_path, dtype=dtype)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"exported {ckpt.path} ({num_params(model) / 1e6:.2f}M parameters) to {out}: {files}")
    return out


if __name__ == "__main__":
    setup_logging(0)  # the log says which Hugging Face class was taken, and why the ones before it were not
    run_cli(main, ExportArgs)
