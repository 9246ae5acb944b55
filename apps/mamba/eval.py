"""Evaluate a Mamba checkpoint (validation bits per byte, optionally lm-eval tasks) with the shared eval app:

    python -m apps.mamba.eval ckpt_dir=runs/mamba_debug dump_dir=runs/mamba_debug/eval [validation.max_docs=20]

Every option is apps.main.eval's; only the model class differs.
"""

from apps.main.eval import EvalAppArgs, main as eval_main
from apps.mamba.model import Mamba, MambaArgs
from lingua.args import run_cli


def main(args: EvalAppArgs) -> dict:
    return eval_main(args, model_cls=Mamba, args_cls=MambaArgs)


if __name__ == "__main__":
    run_cli(main, EvalAppArgs)
