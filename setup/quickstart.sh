#!/usr/bin/env bash
# The README's first command: environment, default corpus, tokenizer, token shards, debug training (with a progress
# display), evaluation, a generated sample and the Hugging Face export. Every stage is skipped when its output is
# already complete, so re-running is fast (a finished training run is detected from its final checkpoint; pass extra
# key=value overrides to the trainer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup/setup_env.sh
PY=.venv/bin/python
$PY setup/prepare_data.py shakespeare --data_dir data
$PY setup/train_tokenizer.py --data_dir data --source shakespeare --vocab_size 4096
# token shards: the loader memory-maps them instead of tokenizing on the fly (data.format: auto picks them up)
$PY setup/tokenize_data.py --data_dir data --source shakespeare --tokenizer tokenizers/shakespeare_sp4096.model --quiet
$PY -m apps.main.train config=apps/main/configs/debug.yaml "$@"
ckpt=$(ls -d runs/debug/checkpoints/[0-9]* | sort | tail -n 1)
$PY -m apps.main.eval ckpt_dir="$ckpt" dump_dir=runs/debug/eval
$PY -m apps.main.generate ckpt_dir="$ckpt" prompt="ROMEO:" max_gen_len=80 temperature=0.8 seed=0
# Hugging Face export (README "Hugging Face export"): the debug recipe (ReLU² + QK-norm + tied) has no native
# transformers class, so it is written as lingua's LinguaForCausalLM with its code (trust_remote_code=True)
if $PY -c "import safetensors, transformers" 2>/dev/null; then
  $PY -m apps.main.export_hf ckpt_dir="$ckpt" out=runs/debug/hf
else
  echo "Hugging Face export (needs: pip install -e '.[hf]'): $PY -m apps.main.export_hf ckpt_dir=$ckpt out=runs/debug/hf"
fi
