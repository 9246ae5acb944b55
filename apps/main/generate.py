"""Sample completions from a checkpoint and report tokens per second.

    python -m apps.main.generate ckpt_dir=runs/debug/checkpoints/0000001000 prompt="ROMEO:" max_gen_len=100
    python -m apps.main.generate ckpt_dir=... prompts_file=prompts.txt temperature=0.8 top_p=0.95 seed=1

ckpt_dir: a DCP or consolidated checkpoint of any lingua app, a Hugging Face Llama directory, or a run directory (its
latest checkpoint).
`prompts_file` holds one prompt per line. Every sampling option of `lingua.eval.generate.GeneratorArgs` is a top-level key
(temperature=0 is greedy; stop=["\\n\\n"] ends completions at a blank line). `prompt=` is taken verbatim.
"""

import functools
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from lingua.args import run_cli
from lingua.errors import ConfigError, LinguaError
from lingua.eval.generate import GenerationStats, Generator, GeneratorArgs
from lingua.eval.load import TokenizerOverride, load_model, pick_device
from lingua.log import setup_logging


@dataclass
class GenerateAppArgs(GeneratorArgs):
    ckpt_dir: str = ""  # a checkpoint of any lingua app (DCP or consolidated), or a Hugging Face model folder
    prompt: Optional[str] = None  # one prompt, taken verbatim (not parsed as YAML)
    prompts_file: Optional[str] = None  # one prompt per line; blank lines are skipped
    device: str = "auto"  # auto | cpu | cuda
    tokenizer: TokenizerOverride = field(default_factory=TokenizerOverride)


def read_prompts(args: GenerateAppArgs) -> list[str]:
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise LinguaError(f"prompts_file '{path}' not found")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give prompt=\"...\" or prompts_file=<file with one prompt per line>")
    return prompts


def format_stats(stats: GenerationStats, args: GeneratorArgs) -> str:
    return (f"{stats.generated_tokens} tokens for {stats.prompts} prompt(s) in {stats.seconds:.2f}s: "
            f"{stats.tok_per_s:.1f} tok/s (batch_size {args.batch_size}, cache {'on' if args.use_cache else 'off'})")


def main(args: GenerateAppArgs, prompt: Optional[str] = None) -> tuple[list[str], GenerationStats]:
    """`prompt`, when given, replaces args.prompt: the command line passes it verbatim (see `cli`). Any lingua
    checkpoint works: its params.json names the architecture."""
    if prompt is not None:
        args.prompt = prompt
    setup_logging(0, level=logging.WARNING)  # the output is the completions, not the loading chatter
    if not args.ckpt_dir:
        raise ConfigError("ckpt_dir is required (a checkpoint, consolidated or Hugging Face directory)")
    prompts = read_prompts(args)
    gen_args = GeneratorArgs(**{f.name: getattr(args, f.name) for f in fields(GeneratorArgs)})
    model, _, tokenizer = load_model(args.ckpt_dir, pick_device(args.device), gen_args.dtype, args.tokenizer)
    completions, stats = Generator(model, tokenizer, gen_args).generate(prompts)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        print(f"=== [{i + 1}/{len(prompts)}] {prompt!r}")
        print(prompt + completion, flush=True)
    print(format_stats(stats, gen_args), flush=True)
    return completions, stats


def cli(argv: Optional[list[str]] = None):
    """Like run_cli, but `prompt=...` is taken verbatim rather than parsed as YAML, so `prompt=ROMEO:` stays a string
    (a YAML parse would read it as a mapping) and `prompt=42` is not a number."""
    argv = list(sys.argv[1:] if argv is None else argv)
    raw = [a.split("=", 1)[1] for a in argv if a.startswith("prompt=")]
    rest = [a for a in argv if not a.startswith("prompt=")]
    return run_cli(functools.partial(main, prompt=raw[-1] if raw else None), GenerateAppArgs, rest)


if __name__ == "__main__":
    cli()
