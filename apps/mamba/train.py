"""Train the Mamba-2 model: `python -m apps.mamba.train config=apps/mamba/configs/debug.yaml [key=value ...]`.

The loop is lingua.train.loop; the model and its ModelSpec are apps/mamba/model.py.
"""

from apps.mamba.model import MAMBA_SPEC
from lingua.train.loop import main

if __name__ == "__main__":
    main(MAMBA_SPEC)
