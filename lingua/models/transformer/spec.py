"""The transformer's ModelSpec: what the train loop, evaluation, generation and export need to know about it."""

from lingua.models.spec import ModelSpec
from lingua.models.transformer.hf import LLAMA
from lingua.models.transformer.model import (
    Transformer,
    TransformerArgs,
    flops_per_token,
)
from lingua.models.transformer.parallelize import parallelize_transformer
from lingua.tools.attention_report import format_report, report_attention


def describe_attention(model_args, device, dtype, seq_len) -> str:
    """The attention report (which SDPA kernel runs, and why) for a transformer-block model: its `describe`."""
    return format_report(report_attention(model_args, device, dtype, seq_len=seq_len))


TRANSFORMER_SPEC = ModelSpec(name="transformer", path="lingua.models.transformer.spec:TRANSFORMER_SPEC",
                             args_cls=TransformerArgs, build=Transformer, flops_per_token=flops_per_token,
                             parallelize=parallelize_transformer, hf=LLAMA, describe=describe_attention)
