"""Train the Llama-style transformer: `python -m apps.main.train config=apps/main/configs/debug.yaml [key=value ...]`.

The loop itself is lingua.train.train; this app only says which model to build and how to count its FLOPs.
"""

from lingua.args import run_cli
from lingua.train import ModelSpec, TrainArgs, train
from lingua.transformer import Transformer, flops_per_token


def describe_attention(model_args, device, dtype, seq_len) -> str:
    from lingua.attention_report import format_report, report_attention

    return format_report(report_attention(model_args, device, dtype, seq_len=seq_len))


TRANSFORMER_SPEC = ModelSpec(build=Transformer, flops_per_token=flops_per_token, describe=describe_attention)


def main(args: TrainArgs):
    return train(args, TRANSFORMER_SPEC)


if __name__ == "__main__":
    run_cli(main, TrainArgs)
