"""Train the Llama-style transformer: `python -m apps.main.train config=apps/main/configs/debug.yaml [key=value ...]`.

The loop is lingua.train; the model is lingua/transformer.py and its ModelSpec lingua.spec.TRANSFORMER_SPEC.
"""

from lingua.spec import TRANSFORMER_SPEC
from lingua.train import main

if __name__ == "__main__":
    main(TRANSFORMER_SPEC)
