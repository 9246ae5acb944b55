"""Train a mixture-of-experts model with the shared loop:

    python -m apps.moe.train config=apps/moe/configs/debug.yaml

The loop is lingua.train.loop; the model and its ModelSpec are apps/moe/model.py. The logged `loss` is the cross-entropy
plus the weighted aux and z losses; `moe/*` columns of metrics.jsonl hold the per-layer expert load.
"""

from apps.moe.model import MOE_SPEC
from lingua.train.loop import main

if __name__ == "__main__":
    main(MOE_SPEC)
