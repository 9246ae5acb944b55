"""Train the Llama-style transformer: `python -m apps.main.train config=apps/main/configs/debug.yaml [key=value ...]`.

The loop is lingua.train.loop; the model is lingua/models/transformer/model.py and its ModelSpec lingua.models.spec.TRANSFORMER_SPEC.
"""

from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import main

if __name__ == "__main__":
    main(TRANSFORMER_SPEC)
