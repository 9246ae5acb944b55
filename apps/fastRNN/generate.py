"""Sample from a fastRNN checkpoint with the main app's generator, carrying the recurrent state between steps:

    python -m apps.fastRNN.generate ckpt_dir=runs/fastrnn_debug prompt="ROMEO:" max_gen_len=100
"""

from typing import Optional

from apps.fastRNN.model import FastRNN, FastRNNArgs
from apps.main.generate import cli


def main(argv: Optional[list[str]] = None):
    return cli(argv, model_cls=FastRNN, args_cls=FastRNNArgs)


if __name__ == "__main__":
    main()
