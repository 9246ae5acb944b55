"""A local lm-eval task, shared by the harness tests (tests/test_harness.py) and the Hugging Face ones
(tests/test_hf_kinds.py: `lm_eval --model hf` on an export); conftest.py's `offline` fixture keeps it offline."""

import json
import random

from tests.conftest import WORDS

TASK_YAML = """task: lingua_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder, n_docs=12, seed=0) -> str:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        question = f"{rng.choice(['ROMEO', 'JULIET'])}: " + " ".join(rng.choice(WORDS) for _ in range(5))
        choices = rng.sample(WORDS, 4)
        docs.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "lingua_local_mc.yaml").write_text(TASK_YAML.format(data=data, cache=folder / "cache"))
    return str(folder / "tasks")
