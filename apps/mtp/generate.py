"""Sample from a multi-token prediction checkpoint with its next-token head (same options as apps.main.generate):

    python -m apps.mtp.generate ckpt_dir=runs/mtp_debug prompt="ROMEO:" max_gen_len=100

For greedy decoding several tokens per forward with the extra heads as drafters, see apps.mtp.speculative.
"""

import functools

from apps.main.generate import cli as generate_cli, main as generate_main
from apps.mtp.model import MTPArgs, MTPTransformer

main = functools.partial(generate_main, model_cls=MTPTransformer, args_cls=MTPArgs)
cli = functools.partial(generate_cli, model_cls=MTPTransformer, args_cls=MTPArgs)

if __name__ == "__main__":
    cli()
