#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent), prepare the small default corpus + tokenizer the
# end-to-end tests train on, then run the whole suite (slow tests included). Extra arguments go to pytest, e.g.
# `--cov=lingua --cov=apps --cov-report=term` for line coverage (about 10% slower: off in CI, which has 20 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
LINGUA_EXTRAS=dev,hf,eval,tiktoken,data,wandb,tensorboard bash setup/setup_env.sh
.venv/bin/python setup/prepare_data.py shakespeare --data_dir data
.venv/bin/python setup/train_tokenizer.py --data_dir data --source shakespeare
.venv/bin/python setup/tokenize_data.py --data_dir data --source shakespeare \
  --tokenizer tokenizers/shakespeare_sp4096.model --quiet
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
# pytest's exit code 5 means no test was collected: that is a failure, never a pass.
[ "$rc" -eq 5 ] && echo "no tests were collected" >&2
exit "$rc"
