"""Train a recurrent LM: `python -m apps.fastRNN.train config=apps/fastRNN/configs/debug.yaml [model.cell=hawk ...]`.

The loop is lingua.train.loop; the models and their ModelSpec are apps/fastRNN/model.py.
"""

from apps.fastRNN.model import FASTRNN_SPEC
from lingua.train.loop import main

if __name__ == "__main__":
    main(FASTRNN_SPEC)
