"""Sample from a Mamba checkpoint with the shared generator; decoding carries the recurrent state (MambaCache):

    python -m apps.mamba.generate ckpt_dir=runs/mamba_debug prompt="ROMEO:" max_gen_len=100

Every option is apps.main.generate's; only the model class differs.
"""

from apps.main.generate import cli
from apps.mamba.model import Mamba, MambaArgs

if __name__ == "__main__":
    cli(model_cls=Mamba, args_cls=MambaArgs)
