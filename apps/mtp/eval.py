"""Evaluate a multi-token prediction checkpoint (next-token head): validation bits per byte, lm-eval tasks.
Same options as apps.main.eval:

    python -m apps.mtp.eval ckpt_dir=runs/mtp_debug dump_dir=runs/mtp_debug/eval
"""

import functools

from apps.main.eval import EvalAppArgs, main as eval_main
from apps.mtp.model import MTPArgs, MTPTransformer
from lingua.args import run_cli

main = functools.partial(eval_main, model_cls=MTPTransformer, args_cls=MTPArgs)

if __name__ == "__main__":
    run_cli(main, EvalAppArgs)
