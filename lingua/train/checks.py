"""Checks of a training config before anything runs: a mistake is one line naming the key (ConfigError), a setting
that is legal but almost surely not meant (lr=0, a warmup longer than the run) is a warning."""

import logging
import os

from lingua.distributed.context_parallel import check_context_parallel
from lingua.errors import ConfigError, LinguaError

logger = logging.getLogger("lingua")

# (dotted key, lowest allowed value): a value below it fails deep inside torch or the loop, far from its cause. The
# model's args check themselves when they are built (lingua.models.decoder.DecoderArgs).
MINIMUMS = (("steps", 1), ("grad_acc_steps", 1), ("data.batch_size", 1), ("data.seq_len", 1), ("logging.freq", 1),
            ("optim.lr", 0.0), ("optim.warmup", 0), ("optim.weight_decay", 0.0),
            ("checkpoint.dump.every", 0), ("checkpoint.eval.every", 0), ("eval.every", 0), ("eval.batch_size", 1),
            ("logging.slow_rank_factor", 0.0),
            ("optim.spike_factor", 0.0), ("optim.spike_window", 1))


def _get(args, dotted: str):
    for part in dotted.split("."):
        args = getattr(args, part, None)
    return args


def check_minimums(args) -> None:
    for key, low in MINIMUMS:
        value = _get(args, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= low:  # NaN fails too
            raise ConfigError(f"{key} must be >= {low} (got {value})")


def warn_unlikely(args) -> None:
    if args.optim.lr == 0:
        logger.warning("optim.lr=0: the weights will not change (intended only to evaluate or to test a pipeline)")
    if args.optim.warmup > args.steps:
        logger.warning(f"optim.warmup={args.optim.warmup} is more than steps={args.steps}: the lr never reaches its "
                       f"peak optim.lr={args.optim.lr}")


def validate_args(args, spec, tokenizer) -> None:
    """Fail on the first bad value in one line; warn about the legal but unlikely ones (rank 0 logs them). Reads
    the config, never changes it: it runs on the resolved config (lingua.train.loop.with_vocab_size)."""
    if not args.dump_dir:
        raise ConfigError("dump_dir is required (e.g. dump_dir=runs/debug)")
    if os.path.exists(args.dump_dir) and not os.path.isdir(args.dump_dir):
        raise LinguaError(f"dump_dir '{args.dump_dir}' exists and is not a directory")
    check_minimums(args)
    if tokenizer.n_words > args.model.vocab_size:
        raise ConfigError(f"tokenizer '{args.data.tokenizer.path or args.data.tokenizer.name}' has "
                          f"{tokenizer.n_words} tokens, more than model.vocab_size={args.model.vocab_size}")
    if args.data.seq_len > args.model.max_seqlen:
        raise ConfigError(f"data.seq_len={args.data.seq_len} is above model.max_seqlen={args.model.max_seqlen}")
    check_context_parallel(args)
    if 0 < args.optim.spike_factor < 1:  # below 1 a run whose loss stops falling would skip every update from then on
        raise ConfigError(f"optim.spike_factor must be 0 (off) or >= 1, got {args.optim.spike_factor}")
    if spec.check_train_args is not None:
        spec.check_train_args(args)
    warn_unlikely(args)
