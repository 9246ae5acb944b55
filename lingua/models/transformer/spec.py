"""The transformer's ModelSpec: what the train loop, evaluation, generation and export need to know about it."""

from lingua.models.spec import ModelSpec
from lingua.models.transformer.hf_arcee import ARCEE
from lingua.models.transformer.hf_lingua import LINGUA
from lingua.models.transformer.hf_llama import LLAMA
from lingua.models.transformer.hf_qwen3 import QWEN3
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


# Hugging Face classes in order of preference: a native one where it computes the model exactly (vLLM and llama.cpp
# load those too), else lingua's own remote-code class, which expresses every switch
TRANSFORMER_HF = (LLAMA, QWEN3, ARCEE, LINGUA)

TRANSFORMER_SPEC = ModelSpec(name="transformer", path="lingua.models.transformer.spec:TRANSFORMER_SPEC",
                             args_cls=TransformerArgs, build=Transformer, flops_per_token=flops_per_token,
                             parallelize=parallelize_transformer, hf=TRANSFORMER_HF, describe=describe_attention)
