"""lm-evaluation-harness over our model, offline: a local multiple-choice task against our own log-likelihoods."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lingua.args import load_config  # noqa: E402
from lingua.eval.generate import Generator, GeneratorArgs  # noqa: E402
from lingua.eval.harness import LinguaLM  # noqa: E402
from lingua.eval.load import load_model  # noqa: E402
from lingua.models.transformer.spec import TRANSFORMER_SPEC  # noqa: E402
from lingua.models.transformer.model import Transformer, TransformerArgs  # noqa: E402
from lingua.train.loop import TrainArgs, train  # noqa: E402
from tests.conftest import ROOT, tiny_overrides, write_corpus  # noqa: E402
from tests.harness_helpers import write_task  # noqa: E402

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    corpus = write_corpus(root / "corpus", sources=("alpha",))
    train(load_config(TrainArgs, tiny_overrides(corpus, root / "run", steps=4, eval__at_end=False)), TRANSFORMER_SPEC)
    model, _, tokenizer = load_model(str(root / "run"))
    return model, tokenizer, root / "run"


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer.encode(context, add_bos=True, add_eos=False)
    cont = tokenizer.encode(continuation, add_bos=False, add_eos=False)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ctx + cont]))[0].double(), dim=-1)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_harness_accuracy_equals_accuracy_from_our_loglikelihoods(trained, offline, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tokenizer, _ = trained
    include = write_task(tmp_path)
    out = lm_eval.simple_evaluate(model=LinguaLM(model, tokenizer, batch_size=5), tasks=["lingua_local_mc"],
                                  task_manager=TaskManager(include_path=include, include_defaults=False),
                                  log_samples=False, bootstrap_iters=0)
    metrics = out["results"]["lingua_local_mc"]
    docs = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    hits, hits_norm = 0, 0
    for doc in docs:
        lls = [direct_loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        hits += max(range(4), key=lambda i: (lls[i], -i)) == doc["answer"]
        hits_norm += max(range(4), key=lambda i: (norm[i], -i)) == doc["answer"]
    assert metrics["acc,none"] == pytest.approx(hits / len(docs))
    assert metrics["acc_norm,none"] == pytest.approx(hits_norm / len(docs))
    assert out["n-samples"]["lingua_local_mc"]["effective"] == len(docs)


def test_eval_app_runs_a_local_harness_task(trained, offline, tmp_path):
    from apps.main.eval import EvalAppArgs
    from apps.main.eval import main as eval_main

    include = write_task(tmp_path, n_docs=4)
    run = trained[2]
    args = load_config(EvalAppArgs, [f"ckpt_dir={run}", f"dump_dir={tmp_path / 'out'}", "validation.enabled=false",
                                     "harness.tasks=[lingua_local_mc]", f"harness.include_path={include}",
                                     "harness.include_defaults=false", "harness.bootstrap_iters=0"])
    results = eval_main(args)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0 <= saved["harness"]["results"]["lingua_local_mc"]["acc,none"] <= 1
    assert saved["harness"]["results"] == json.loads(json.dumps(results["harness"]["results"], default=str))


def test_loglikelihood_is_batch_independent_and_reports_greedy(trained):
    model, tokenizer, _ = trained
    reqs = [SimpleNamespace(args=(c, k)) for c, k in
            [("ROMEO: thou art", " the king"), ("", "JULIET"), ("a", "b"), ("the night ", "is dark"), ("x" * 40, " y")]]
    one = LinguaLM(model, tokenizer, batch_size=1).loglikelihood(reqs)
    many = LinguaLM(model, tokenizer, batch_size=5).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # trailing spaces move into the continuation; empty context is BOS alone
    assert one[3][0] == pytest.approx(direct_loglikelihood(model, tokenizer, "the night", " is dark"), abs=1e-4)
    assert one[1][0] == pytest.approx(direct_loglikelihood(model, tokenizer, "", "JULIET"), abs=1e-4)
    # is_greedy, on ids (a byte-level greedy continuation of a barely trained model need not be valid UTF-8)
    ctx = tokenizer.encode("ROMEO:", add_eos=False)
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([ctx + greedy]))[0, -1].argmax()))
    lm = LinguaLM(model, tokenizer)
    assert lm.score([(ctx, greedy)])[0][1] and not lm.score([(ctx, greedy[:2] + [(greedy[2] + 1) % 256])])[0][1]


def test_loglikelihood_rolling_scores_every_token_once_in_windows():
    args = TransformerArgs(dim=32, n_layers=2, n_heads=4, vocab_size=258, max_seqlen=64, multiple_of=16)
    model = Transformer.build(args).eval()
    from lingua.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    short = "ROMEO: the night"
    (rolled,) = LinguaLM(model, tok).loglikelihood_rolling([SimpleNamespace(args=(short,))])
    assert rolled == pytest.approx(direct_loglikelihood(model, tok, "", short), abs=1e-4)
    # 150 bytes, 64-token windows: BOS + t[0:63] predicts t[0:64]; t[63:127] predicts t[64:128]; the last window
    # keeps a full context, t[85:149], and predicts only t[128:150]: every token once
    text = ("JULIET: my lord " * 10)[:150]
    model.args.max_seqlen = 64
    (rolled,) = LinguaLM(model, tok).loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = list(text.encode())
    expected = 0.0
    with torch.no_grad():
        for window, n_pred, end in (([tok.bos_id] + ids[:63], 64, 64), (ids[63:127], 64, 128), (ids[85:149], 22, 150)):
            logprobs = F.log_softmax(model(torch.tensor([window]))[0].double(), dim=-1)[-n_pred:]
            expected += sum(logprobs[i, t].item() for i, t in enumerate(ids[end - n_pred: end]))
    assert rolled == pytest.approx(expected, abs=1e-3)


def test_generate_until_stops_at_until_and_matches_the_generator(trained):
    model, tokenizer, _ = trained
    lm = LinguaLM(model, tokenizer, batch_size=2)
    free, _ = Generator(model, tokenizer, GeneratorArgs(max_gen_len=12)).generate(["ROMEO:", "JULIET: the"])
    stop = free[0][2:4]
    reqs = [SimpleNamespace(args=("ROMEO:", {"until": [stop], "max_gen_toks": 12})),
            SimpleNamespace(args=("JULIET: the", {"until": "never", "max_gen_toks": 12}))]
    out = lm.generate_until(reqs)
    assert out == [free[0][: free[0].index(stop)], free[1]]


def test_without_lm_eval_the_harness_fails_in_one_line():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from lingua.errors import LinguaError\n"
            "try:\n    import lingua.eval.harness\nexcept LinguaError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "install it with: pip install -e '.[eval]'" in proc.stdout
