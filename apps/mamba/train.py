"""Train the Mamba-2 model: `python -m apps.mamba.train config=apps/mamba/configs/debug.yaml [key=value ...]`.

The loop itself is lingua.train.train; this app only says which model to build and how to count its FLOPs.
"""

from dataclasses import dataclass, field

from apps.mamba.model import Mamba, MambaArgs, flops_per_token
from lingua.args import run_cli
from lingua.errors import ConfigError
from lingua.train import ModelSpec, TrainArgs, train


@dataclass
class MambaTrainArgs(TrainArgs):
    model: MambaArgs = field(default_factory=MambaArgs)


def no_tensor_parallel(model, tp_mesh, loss_parallel):
    raise ConfigError("the mamba app has no tensor-parallel plan: set distributed.tp_size=1 (FSDP/DDP work)")


MAMBA_SPEC = ModelSpec(build=Mamba, flops_per_token=flops_per_token, tp_plan=no_tensor_parallel)


def main(args: MambaTrainArgs):
    return train(args, MAMBA_SPEC)


if __name__ == "__main__":
    run_cli(main, MambaTrainArgs)
