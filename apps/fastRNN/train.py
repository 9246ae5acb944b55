"""Train a recurrent LM: `python -m apps.fastRNN.train config=apps/fastRNN/configs/debug.yaml [model.cell=hawk ...]`.

The loop is lingua.train.train; this app says which model to build and how to count its FLOPs.
"""

from dataclasses import dataclass, field

from apps.fastRNN.model import FastRNN, FastRNNArgs, flops_per_token
from lingua.args import run_cli
from lingua.parallelize import no_tensor_parallel
from lingua.train import ModelSpec, TrainArgs, train


@dataclass
class FastRNNTrainArgs(TrainArgs):
    model: FastRNNArgs = field(default_factory=FastRNNArgs)


FASTRNN_SPEC = ModelSpec(build=FastRNN, flops_per_token=flops_per_token, tp_plan=no_tensor_parallel("fastRNN"))


def main(args: FastRNNTrainArgs):
    return train(args, FASTRNN_SPEC)


if __name__ == "__main__":
    run_cli(main, FastRNNTrainArgs)
