"""Train a multi-token prediction model with the shared loop:

    python -m apps.mtp.train config=apps/mtp/configs/debug.yaml

The loop is lingua.train.loop; the model and its ModelSpec are apps/mtp/model.py. The data loader gives head k its target
(token t + k + 1) through data.n_views = model.n_future_head + 1. The logged `loss` is the sum of the heads' losses
(about n_future_head times the next-token loss); eval bits-per-byte scores the next-token head only.
"""

from apps.mtp.model import MTP_SPEC
from lingua.train.loop import main

if __name__ == "__main__":
    main(MTP_SPEC)
