"""Evaluate a fastRNN checkpoint (validation bits per byte, lm-eval tasks) with the main app's evaluator:

    python -m apps.fastRNN.eval ckpt_dir=runs/fastrnn_debug dump_dir=runs/fastrnn_debug/eval [validation.max_docs=20]
"""

from apps.fastRNN.model import FastRNN, FastRNNArgs
from apps.main.eval import EvalAppArgs, main as eval_main
from lingua.args import run_cli


def main(args: EvalAppArgs) -> dict:
    return eval_main(args, model_cls=FastRNN, args_cls=FastRNNArgs)


if __name__ == "__main__":
    run_cli(main, EvalAppArgs)
