#!/usr/bin/env bash
# The prepared one-GPU check of issue 13, for a lent `device` machine (one H200; its python3 has torch with CUDA,
# numpy, sentencepiece and PyYAML, but not omegaconf). Here, once: the corpus and tokenizer (README) and omegaconf's
# wheels in .whl/ (ignored by git):
#   pip download --no-deps --only-binary=:all: -d .whl omegaconf==2.3.0
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# Then one call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "data/shakespeare", "tokenizers"]).
# It prints (and writes under $OUT) the attention report and benchmarks/train_throughput.py at the shapes of
# apps/main/configs/llama_1B.yaml (dim 2048, 25 layers, 16 heads, seq 4096, batch 4, Llama's SwiGLU and untied
# output) on the shakespeare corpus with its 4k vocabulary: lingua's default against the plain loop's bf16 +
# compile, both causal, tok/s, MFU against the GPU's table peak, where the step time goes; then lingua with the
# shipped block-causal mask (flex_attention) against the same plain loop, labelled as what document masking costs. STEPS=n changes the step count;
# SMOKE=1 shrinks the model to 1 layer of 256 (a CPU dry run of this script: every mode compiles, one layer halves that).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lingua_gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import omegaconf" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"

DIM=2048 LAYERS=25 HEADS=16 SEQ=4096 BATCH=4
if [ "${SMOKE:-0}" = 1 ]; then DIM=256 LAYERS=1 HEADS=4 SEQ=256 BATCH=2; fi
MODEL=(model.dim=$DIM model.n_layers=$LAYERS model.n_heads=$HEADS model.rope_theta=100000.0 model.max_seqlen=$SEQ
       model.mlp=swiglu model.weight_tying=false model.qk_norm=false model.init_std_factor=disabled)
DATA=(data.seq_len=$SEQ data.batch_size=$BATCH)

# the kernels lingua runs for the shipped block-causal configs: flex for training, SDPA through the KV cache
$PY -m lingua.attention_report config=apps/main/configs/debug.yaml "${MODEL[@]}" model.mask=block_causal \
  model.attn_impl=auto dtype=bf16 seq_len=$SEQ 2>&1 | tee "$OUT/attention_report.txt"
# like with like: the plain loop is causal, so lingua is too here (SDPA's is_causal flash path)
$PY benchmarks/train_throughput.py --shapes config --steps "${STEPS:-20}" --repeats 1 \
  --lingua-modes default,bf16-eager --plain-modes bf16-compile,bf16-eager "${MODEL[@]}" model.mask=causal \
  "${DATA[@]}" 2>&1 | grep -v " INFO step " | tee "$OUT/train_throughput.txt"
# what packed documents cost: lingua block_causal (flex, masked blocks skipped) against the same causal plain loop
$PY benchmarks/train_throughput.py --shapes config --steps "${STEPS:-20}" --repeats 1 --no-breakdown \
  --lingua-modes default --plain-modes bf16-compile "${MODEL[@]}" model.mask=block_causal "${DATA[@]}" \
  2>&1 | grep -v " INFO step " | tee "$OUT/train_throughput_block_causal.txt"
