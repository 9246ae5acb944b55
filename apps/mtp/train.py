"""Train a multi-token prediction model with the shared loop:

    python -m apps.mtp.train config=apps/mtp/configs/debug.yaml

The loop is lingua.train.train; this app says which model to build and how to count its FLOPs. The data loader gives
head k its target (token t + k + 1) through data.n_views = model.n_future_head + 1. The logged `loss` is the sum of
the heads' losses (about n_future_head times the next-token loss); eval bits-per-byte scores the next-token head only.
"""

from dataclasses import dataclass, field

from apps.main.train import describe_attention
from apps.mtp.model import MTPArgs, MTPTransformer, flops_per_token
from lingua.args import run_cli
from lingua.errors import ConfigError
from lingua.train import ModelSpec, TrainArgs, train


@dataclass
class MTPTrainArgs(TrainArgs):
    model: MTPArgs = field(default_factory=MTPArgs)


MTP_SPEC = ModelSpec(build=MTPTransformer, flops_per_token=flops_per_token, describe=describe_attention)


def main(args: MTPTrainArgs):
    if args.data.n_views != args.model.n_future_head + 1:
        raise ConfigError(f"data.n_views={args.data.n_views} must be model.n_future_head + 1 = "
                          f"{args.model.n_future_head + 1} (one target view per head)")
    return train(args, MTP_SPEC)


if __name__ == "__main__":
    run_cli(main, MTPTrainArgs)
