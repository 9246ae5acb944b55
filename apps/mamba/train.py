"""Train the Mamba-2 model: `python -m apps.mamba.train config=apps/mamba/configs/debug.yaml [key=value ...]`.

The loop itself is lingua.train.train; this app only says which model to build and how to count its FLOPs.
"""

from dataclasses import dataclass, field

from apps.mamba.model import Mamba, MambaArgs, flops_per_token
from lingua.args import run_cli
from lingua.parallelize import no_tensor_parallel
from lingua.train import ModelSpec, TrainArgs, train


@dataclass
class MambaTrainArgs(TrainArgs):
    model: MambaArgs = field(default_factory=MambaArgs)


MAMBA_SPEC = ModelSpec(build=Mamba, flops_per_token=flops_per_token, tp_plan=no_tensor_parallel("the mamba app"))


def main(args: MambaTrainArgs):
    return train(args, MAMBA_SPEC)


if __name__ == "__main__":
    run_cli(main, MambaTrainArgs)
