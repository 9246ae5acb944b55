"""Shared fixtures: a tiny two-source corpus in lingua's layout and a helper to build a tiny training config."""

import atexit
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lingua.checkpoint.manager import list_checkpoints  # noqa: E402
from lingua.checkpoint.weights import consolidate  # noqa: E402

# Tests run many tiny models: one thread each keeps them fast and deterministic on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# attention timings (lingua/kernels/attention/measure.py) go to a fresh folder, never to the user's ~/.cache/lingua
os.environ.setdefault("LINGUA_CACHE_DIR", tempfile.mkdtemp(prefix="lingua_cache_"))

WORDS = ("the king queen lord lady sword crown night day love death ROMEO JULIET speak hath thou thee art "
         "doth shall not is and of to a my your his her").split()


def _doc(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["ROMEO", "JULIET", "KING", "QUEEN"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        lines.append(f"{speaker}: {words}.")
    return "\n".join(lines)


def write_corpus(root: Path, sources=("alpha", "beta"), n_docs=60, n_chunks=2, seed=0) -> Path:
    """`<root>/<source>/<source>.chunk.<k>.jsonl` + `<source>.val.jsonl`, as setup/prepare_data.py writes them."""
    rng = random.Random(seed)
    for source in sources:
        folder = root / source
        folder.mkdir(parents=True, exist_ok=True)
        docs = [{"text": _doc(rng, rng.randint(2, 8)), "source": source, "id": i} for i in range(n_docs)]
        for k in range(n_chunks):
            with open(folder / f"{source}.chunk.{k:02d}.jsonl", "w") as f:
                for d in docs[k::n_chunks]:
                    f.write(json.dumps(d) + "\n")
        with open(folder / f"{source}.val.jsonl", "w") as f:
            for i in range(8):
                f.write(json.dumps({"text": _doc(rng, 4), "source": source, "id": 10_000 + i}) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_overrides(corpus: Path, dump_dir: Path, **extra) -> list[str]:
    """key=value overrides for a ~30k-parameter model on the bytes tokenizer that trains in a few seconds."""
    base = {
        "dump_dir": str(dump_dir),
        "steps": 8,
        "model.dim": 32,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.vocab_size": 258,
        "model.max_seqlen": 64,
        "model.mask": "block_causal",
        "data.root_dir": str(corpus),
        "data.sources.alpha": 1.0,
        "data.batch_size": 4,
        "data.seq_len": 32,
        "data.load_async": False,
        "data.tokenizer.name": "bytes",
        "optim.lr": 3e-3,
        "optim.warmup": 2,
        "logging.freq": 1,
        "logging.progress": False,
        "logging.peak_flops": 1e11,
        "checkpoint.dump.every": 4,
        "eval.max_docs": 4,
        "distributed.model_dtype": "fp32",
        "distributed.compile": False,  # compiling costs tens of seconds per process: tests run eager unless they ask
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_weights(dump_dir) -> dict:
    """Every weight of a run's latest checkpoint, consolidated into plain tensors."""
    out = Path(dump_dir) / "consolidated"
    consolidate(str(list_checkpoints(Path(dump_dir) / "checkpoints")[-1]), str(out))
    return torch.load(out / "consolidated.pth", weights_only=True)["model"]


def losses(dump_dir) -> dict:
    return {m["step"]: m["loss"] for m in read_jsonl(Path(dump_dir) / "metrics.jsonl")}


def cut_at(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had been stopped right after saving `step`."""
    shutil.copytree(src, dst)
    for p in list_checkpoints(dst / "checkpoints"):
        if int(p.name) > step:
            shutil.rmtree(p)
    for name in ("metrics.jsonl", "metrics.eval.jsonl"):
        if (dst / name).is_file():
            rows = [r for r in read_jsonl(dst / name) if r["step"] <= step]
            (dst / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A 400-piece BPE trained like setup/train_tokenizer.py (identity normalisation, no dummy prefix, bytes)."""
    import sentencepiece as spm

    rng = random.Random(0)
    text = [_doc(rng, 6) for _ in range(150)]
    text += ["Numbers 12345 and 3.14, café naïve — 日本語 🙂", "  two  spaces\tand"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No network and a private cache for datasets / the hub, whether or not they were imported already."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(home))):
            mp.setenv(key, value)
        if "datasets" in sys.modules:
            mp.setattr(sys.modules["datasets"].config, "HF_DATASETS_OFFLINE", True)
            mp.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True, raising=False)
        yield home


def hf_offline_env() -> None:
    """transformers reads these when it is imported: never touch the network or the user's cache (remote-code
    modules included) from a test."""
    if os.environ.get("LINGUA_TEST_HF_HOME") is None:
        os.environ["LINGUA_TEST_HF_HOME"] = os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="lingua-test-hf-home-")
        atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def assert_bits_per_byte(row: dict, corpus: Path, source: str, max_docs: int):
    """An eval row's bpb is its mean NLL in bits times tokens per byte, over the UTF-8 bytes of the first max_docs
    documents of the val file (lingua/eval/bpb.py computes it from sums, this from the logged means)."""
    with open(Path(corpus) / source / f"{source}.val.jsonl") as f:
        n_bytes = sum(len(json.loads(line)["text"].encode()) for line in f.readlines()[:max_docs])
    assert row[f"{source}/bytes"] == n_bytes
    bits = row[f"{source}/nll"] * row[f"{source}/tokens"] / math.log(2)
    assert row[f"{source}/bpb"] == pytest.approx(bits / n_bytes, rel=1e-9)  # float64 sums, rounded differently


def greedy_ids(model, tok, prompt: str, max_gen_len: int) -> list[int]:
    """What a greedy Generator samples for `prompt` (BOS first), found by re-running the plain forward over the whole
    sequence, argmax over the tokenizer's ids: the sampled ids, the EOS included when it ends the row early. Its
    length is what GenerationStats.generated_tokens counts; the ids without the EOS decode to the completion."""
    ids, out = tok.encode(prompt, add_bos=True, add_eos=False), []
    with torch.no_grad():
        for _ in range(max_gen_len):
            nxt = int(model(torch.tensor([ids + out]))[0, -1, : tok.n_words].argmax())
            out.append(nxt)
            if nxt == tok.eos_id:
                break
    return out
