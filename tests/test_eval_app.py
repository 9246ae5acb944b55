"""The eval app end to end on a tiny trained checkpoint, bits per byte against a direct computation, load_model."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apps.main.eval import EvalAppArgs
from apps.main.eval import main as eval_main
from lingua.args import load_config
from lingua.checkpoint.weights import consolidate
from lingua.data.tokenizer import ByteTokenizer
from lingua.errors import ConfigError, LinguaError
from lingua.eval.load import TokenizerOverride, load_model
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, train
from tests.conftest import ROOT, tiny_overrides, write_corpus

# a long RoPE table lets validation put several whole documents in one sequence (the weights do not depend on it)
MAX_SEQLEN = 1024


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run of the tiny model on a two-source corpus: (corpus dir, checkpoint dir)."""
    root = tmp_path_factory.mktemp("eval_app")
    corpus = write_corpus(root / "corpus")
    overrides = tiny_overrides(corpus, root / "run", steps=4, model__max_seqlen=MAX_SEQLEN, eval__at_end=False,
                               **{"data.sources.beta": 1.0})
    train(load_config(TrainArgs, overrides), TRANSFORMER_SPEC)
    return corpus, root / "run" / "checkpoints" / "0000000004"


def run_eval(tmp_path, ckpt, *overrides) -> dict:
    args = load_config(EvalAppArgs, [f"ckpt_dir={ckpt}", f"dump_dir={tmp_path / 'out'}", *overrides])
    eval_main(args)
    return json.loads((tmp_path / "out" / "results.json").read_text())


def val_docs(corpus: Path, source: str, n: int) -> list[str]:
    with open(corpus / source / f"{source}.val.jsonl") as f:
        return [json.loads(line)["text"] for line in f][:n]


def direct_bpb(model, docs: list[str]) -> float:
    """Each document scored on its own (BOS ... EOS, positions from 0); the next document's BOS is predicted from the
    end of the previous one, as block-causal packing scores it. Sum of NLL / ln 2 / UTF-8 bytes."""
    tok = ByteTokenizer()
    nll = 0.0
    with torch.no_grad():
        for i, doc in enumerate(docs):
            ids = torch.tensor([tok.encode(doc)])
            logprobs = F.log_softmax(model(ids)[0].double(), dim=-1)  # (len, vocab)
            nll -= logprobs[:-1].gather(-1, ids[0, 1:, None]).sum().item()
            if i + 1 < len(docs):
                nll -= logprobs[-1, tok.bos_id].item()
    return nll / math.log(2) / sum(len(d.encode("utf-8")) for d in docs)


def test_eval_app_bpb_per_source_equals_a_direct_computation(trained, tmp_path, capsys):
    corpus, ckpt = trained
    results = run_eval(tmp_path, ckpt, "validation.max_docs=3", f"validation.seq_len={MAX_SEQLEN}")
    assert set(results["validation"]) == {"alpha", "beta"}  # the checkpoint's sources by default
    model, _, _ = load_model(str(ckpt))
    for source in ("alpha", "beta"):
        docs = val_docs(corpus, source, 3)
        r = results["validation"][source]
        assert r["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert r["tokens"] == sum(len(d.encode("utf-8")) + 2 for d in docs) - 1  # every token but the first BOS
        assert r["bpb"] == pytest.approx(direct_bpb(model, docs), rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
    out = capsys.readouterr().out
    assert "bits/byte" in out and "alpha" in out and "beta" in out


def test_short_sequences_score_every_token_once_and_consolidated_gives_the_same(trained, tmp_path):
    corpus, ckpt = trained
    dcp_results = run_eval(tmp_path / "dcp", ckpt, "validation.sources=[beta]")  # seq_len 32 from the checkpoint
    docs = val_docs(corpus, "beta", 100)
    r = dcp_results["validation"]["beta"]
    assert r["tokens"] == sum(len(d.encode("utf-8")) + 2 for d in docs) - 1
    assert r["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    consolidate(str(ckpt), str(tmp_path / "consolidated"))
    cons_results = run_eval(tmp_path / "cons", tmp_path / "consolidated", "validation.sources=[beta]",
                            f"validation.root_dir={corpus}")
    assert cons_results["validation"]["beta"]["bpb"] == pytest.approx(r["bpb"], rel=1e-6)


@pytest.mark.slow
def test_eval_app_under_torchrun_matches_one_process(trained, tmp_path):
    _, ckpt = trained
    one = run_eval(tmp_path / "one", ckpt, "validation.max_docs=5")
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "apps.main.eval",
           f"ckpt_dir={ckpt}", f"dump_dir={tmp_path / 'two'}", "validation.max_docs=5", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for source in ("alpha", "beta"):
        assert two["validation"][source]["tokens"] == one["validation"][source]["tokens"]
        assert two["validation"][source]["bpb"] == pytest.approx(one["validation"][source]["bpb"], rel=1e-6)


def test_eval_app_errors_are_one_line(trained, tmp_path):
    corpus, ckpt = trained
    with pytest.raises(ConfigError, match="ckpt_dir is required"):
        eval_main(EvalAppArgs(dump_dir=str(tmp_path)))
    with pytest.raises(LinguaError, match="is not a checkpoint"):
        eval_main(EvalAppArgs(ckpt_dir=str(corpus), dump_dir=str(tmp_path)))
    with pytest.raises(LinguaError, match="no validation file for source 'gamma'"):
        run_eval(tmp_path, ckpt, "validation.sources=[gamma]")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_eval(tmp_path, ckpt, "validation.enabled=false")
    # the CLI prints one line and exits 1
    proc = subprocess.run([sys.executable, "-m", "apps.main.eval", f"ckpt_dir={tmp_path / 'nope'}", "dump_dir=x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint path '{tmp_path / 'nope'}' does not exist"]


def test_load_model_from_a_run_dir_with_dtype_and_tokenizer_override(trained, tmp_path):
    _, ckpt = trained
    model, args, tok = load_model(str(ckpt.parent.parent), dtype="bf16")  # the run dir: its latest checkpoint
    assert args.max_seqlen == MAX_SEQLEN and tok.n_words == 258 and not model.training
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.freq_cos.dtype == torch.float32
    with pytest.raises(LinguaError, match="tokenizer file '/missing.model' from tokenizer.path not found"):
        load_model(str(ckpt), tokenizer=TokenizerOverride(path="/missing.model"))
    params = json.loads((ckpt / "params.json").read_text())
    params["data"]["tokenizer"] = {"name": "sp", "path": "/moved/tok.model"}
    moved = tmp_path / "moved"
    consolidate(str(ckpt), str(moved))
    (moved / "params.json").write_text(json.dumps(params))
    with pytest.raises(LinguaError, match=r"'/moved/tok.model' from .*params.json .* pass tokenizer.path="):
        load_model(str(moved))
    with pytest.raises(LinguaError, match=r"tokenizer 'bytes' is not the one .*params.json trained with \('sp' "
                                          r"\(/moved/tok.model\)\): pass tokenizer.force=true"):
        load_model(str(moved), tokenizer=TokenizerOverride(name="bytes"))
    _, _, tok = load_model(str(moved), tokenizer=TokenizerOverride(name="bytes", force=True))
    assert tok.n_words == 258


def test_hugging_face_directory_loads_evaluates_and_needs_a_tokenizer(trained, tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from lingua.hf.io import export_hf
    from lingua.models.transformer.hf_llama import LLAMA

    corpus, ckpt = trained
    model, args, _ = load_model(str(ckpt))
    export_hf(LLAMA, model.state_dict(), args, tmp_path / "hf", tokenizer_name="bytes")
    hf_model, _, tok = load_model(str(tmp_path / "hf"))
    assert tok.n_words == 258
    tokens = torch.randint(0, 258, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens), model(tokens), atol=1e-5, rtol=1e-5)
    # validation of an HF dir: root_dir and sources must be given (there is no params.json)
    with pytest.raises(ConfigError, match="validation needs validation.root_dir"):
        run_eval(tmp_path / "e1", tmp_path / "hf")
    # one document: config.json cannot say model.mask=block_causal, so the HF model attends across packed documents
    results = run_eval(tmp_path / "e2", tmp_path / "hf", f"validation.root_dir={corpus}", "validation.sources=[alpha]",
                       "validation.max_docs=1", "validation.seq_len=32")
    reference = run_eval(tmp_path / "e3", ckpt, "validation.sources=[alpha]", "validation.max_docs=1")
    assert results["validation"]["alpha"]["bpb"] == pytest.approx(reference["validation"]["alpha"]["bpb"], rel=1e-5)
    export_hf(LLAMA, model.state_dict(), args, tmp_path / "bare")  # no tokenizer files
    with pytest.raises(LinguaError, match="has no tokenizer lingua can read.*pass tokenizer.path="):
        load_model(str(tmp_path / "bare"))
    assert load_model(str(tmp_path / "bare"), tokenizer=TokenizerOverride(name="bytes"))[2].n_words == 258
