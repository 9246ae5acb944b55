"""Hugging Face interoperability: exported models compute our logits in transformers, round-trip exactly, carry
their tokenizer, and a Hugging Face directory starts a training run. Offline: no hub access anywhere."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import hf_offline_env

hf_offline_env()  # before transformers is imported

try:
    import safetensors  # noqa: F401
    import transformers
except ImportError as e:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"the hf extra is not installed ({e}): pip install -e '.[hf]'", allow_module_level=True)

from apps.main import export_hf as export_app  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.checkpoint.manager import list_checkpoints  # noqa: E402
from lingua.checkpoint.weights import consolidate, load_model_weights  # noqa: E402
from lingua.data.tokenizer import ByteTokenizer, SentencePieceTokenizer  # noqa: E402
from lingua.errors import LinguaError  # noqa: E402
from lingua.hf import io as hf
from lingua.models.layers import ffn_hidden_dim  # noqa: E402
from lingua.models.transformer import hf as hf_tf  # noqa: E402
from lingua.models.transformer.hf_llama import LLAMA  # noqa: E402
from lingua.models.transformer.spec import TRANSFORMER_HF, TRANSFORMER_SPEC  # noqa: E402
from lingua.models.transformer.model import Transformer, TransformerArgs  # noqa: E402
from lingua.train.loop import TrainArgs, train  # noqa: E402
from tests.conftest import ROOT, tiny_overrides  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CONFIGS = {
    "mha-untied": dict(dim=64, n_layers=2, n_heads=4, vocab_size=96),
    "gqa-tied-theta": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, weight_tying=True,
                           rope_theta=500.0, norm_eps=1e-6),
    # 8*48/3 = 128 -> *1.3 = 166 -> multiple of 48: 192, with head_dim 16, 3 query heads sharing 1 KV head
    "ffn-multiplier-mqa": dict(dim=48, n_layers=3, n_heads=3, n_kv_heads=1, vocab_size=80, ffn_dim_multiplier=1.3,
                               multiple_of=48, rope_theta=1e6),
    "head-dim-tied": dict(dim=32, n_layers=1, head_dim=16, vocab_size=64, weight_tying=True, multiple_of=32,
                          ffn_dim_multiplier=0.5),
    # model.qk_norm exports as Qwen3ForCausalLM: its q/k RMSNorm weights go through the RoPE permutation too
    "qk-norm-qwen3": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, qk_norm=True),
    # model.mlp=relu2 without QK-norm is Arcee's computation
    "relu2-arcee": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, mlp="relu2", rope_theta=500.0),
    # what no native class computes: lingua's own class, remote code. The debug recipe (ReLU², QK-norm, tied) ...
    "debug-recipe-remote": dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, mlp="relu2", qk_norm=True,
                                weight_tying=True),
    # ... and the other switches: SwiGLU + soft-cap + GQA + theta, untied
    "softcap-gqa-remote": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, logit_softcap=2.0,
                               rope_theta=500.0, norm_eps=1e-6),
}
# the class each config exports as, and whether it comes as remote code
EXPECTED_CLASS = {"qk-norm-qwen3": "Qwen3ForCausalLM", "relu2-arcee": "ArceeForCausalLM",
                  "debug-recipe-remote": "LinguaForCausalLM", "softcap-gqa-remote": "LinguaForCausalLM"}


def make_model(name: str, seed: int = 0):
    args = TransformerArgs(max_seqlen=64, **CONFIGS[name])
    model = Transformer.build(args, seed=seed)
    with torch.no_grad():  # init leaves every norm at 1: move them so a swapped norm mapping cannot go unnoticed
        gen = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval(), args


def load_hf(path):
    """transformers' model of an export: native classes without remote code, lingua's own only with it."""
    architecture = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    remote = architecture == "LinguaForCausalLM"
    if remote:
        with pytest.raises(ValueError, match="trust_remote_code"):
            transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote)
    assert type(model).__name__ == architecture
    return model.eval()


def greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Full-recompute greedy decoding: re-run the whole sequence for every new token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


# ---------------------------------------------------------------- weights and config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_model_matches_in_transformers(name, tmp_path):
    model, args = make_model(name)
    out = hf.export_hf(TRANSFORMER_HF, model.state_dict(), args, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    theirs = load_hf(out)
    assert type(theirs).__name__ == EXPECTED_CLASS.get(name, "LlamaForCausalLM")
    assert (out / "modeling_lingua.py").is_file() == name.endswith("remote")
    n_heads, n_kv_heads, head_dim = args.heads
    cfg = theirs.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        args.dim, n_heads, n_kv_heads, head_dim)
    assert cfg.intermediate_size == ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier, args.mlp)
    assert (cfg.rope_theta if name.endswith("remote") else cfg.rope_parameters["rope_theta"]) == args.rope_theta
    assert cfg.rms_norm_eps == args.norm_eps
    assert cfg.tie_word_embeddings == args.weight_tying
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not args.weight_tying)

    tokens = torch.randint(0, args.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, their = model(tokens), theirs(tokens).logits
    diff = (ours - their).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e} (logits std {ours.std().item():.2f})")
    assert diff < 1e-4

    prompt = tokens[:, :8]
    ours_gen = greedy(model, prompt, 24)
    their_gen = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours_gen, their_gen)


def test_logits_differ_without_the_rope_permutation(tmp_path, monkeypatch):
    """The layouts really differ: exporting q/k rows as they are gives another model (so the test above can fail)."""
    model, args = make_model("gqa-tied-theta")
    monkeypatch.setattr(hf_tf, "interleaved_to_halves", lambda w, n_heads: w.clone())
    theirs = load_hf(hf.export_hf(LLAMA, model.state_dict(), args, tmp_path))
    tokens = torch.randint(0, args.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - theirs(tokens).logits).abs().max() > 1e-2


def test_rope_permutation_is_a_per_head_inverse_pair():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of head_dim 8
    halves = hf_tf.interleaved_to_halves(w, 2)
    # each head's rows 0, 2, 4, 6 (the first of each pair) then 1, 3, 5, 7
    assert halves[:, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21] + [24, 30, 36, 42, 27, 33, 39, 45]
    assert torch.equal(hf_tf.halves_to_interleaved(halves, 2), w)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_then_import_round_trips_exactly(name, tmp_path):
    model, args = make_model(name, seed=3)
    out = hf.export_hf(TRANSFORMER_HF, model.state_dict(), args, tmp_path)
    back_args = hf.args_from_hf(out, TRANSFORMER_HF)
    assert back_args.heads == args.heads
    for key in ("dim", "n_layers", "norm_eps", "rope_theta", "max_seqlen", "vocab_size", "weight_tying", "mlp",
                "qk_norm", "logit_softcap"):
        assert getattr(back_args, key) == getattr(args, key), key
    assert back_args.ffn_dim == args.ffn_dim
    back = Transformer.build(back_args)
    hf.load_hf_weights(out, back, TRANSFORMER_HF)
    ours, theirs = dict(model.named_parameters()), dict(back.named_parameters())
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert (back.output.weight is back.tok_embeddings.weight) == args.weight_tying
    # and the pure mapping, both ways, tensor for tensor
    sd = model.state_dict()
    again = hf_tf.transformer_from_hf(hf_tf.transformer_to_hf(sd, args), args)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    # export -> import -> export writes the same bytes
    hf.export_hf(TRANSFORMER_HF, back.state_dict(), back_args, tmp_path / "again")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes(), f


def test_bf16_export_keeps_dtype_in_config(tmp_path):
    model, args = make_model("mha-untied")
    out = hf.export_hf(LLAMA, model.state_dict(), args, tmp_path, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_hf(out).dtype == torch.bfloat16


def _write_config(path: Path, **changes) -> Path:
    model, args = make_model("mha-untied")
    hf.export_hf(LLAMA, model.state_dict(), args, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "model_type 'mistral'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "RoPE scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_hf_configs_are_one_line_errors(tmp_path, changes, message):
    path = _write_config(tmp_path, **changes)
    with pytest.raises(LinguaError, match=message) as e:
        hf.args_from_hf(path, LLAMA)
    assert "\n" not in str(e.value)


def test_loading_into_another_shape_names_the_field(tmp_path):
    model, args = make_model("gqa-tied-theta")
    hf.export_hf(LLAMA, model.state_dict(), args, tmp_path)
    other = Transformer.build(TransformerArgs(**{**CONFIGS["gqa-tied-theta"], "n_kv_heads": 4, "max_seqlen": 64}))
    with pytest.raises(LinguaError, match="n_kv_heads=2 but this model has 4"):
        hf.load_hf_weights(tmp_path, other, LLAMA)
    with pytest.raises(LinguaError, match="no config.json"):
        hf.args_from_hf(tmp_path / "nowhere", LLAMA)


# ---------------------------------------------------------------- tokenizers

STRINGS = ["ROMEO: the king hath thou.", "hello world", " leading space", "two  spaces   three",
           "tabs\tand\nnewlines\n\n", "Numbers 12345 and 3.14", "café naïve — 日本語 🙂", "", "x", "a<s>b</s>"]


def test_sentencepiece_tokenizer_export_matches_sentencepiece_ids(sp_model, tmp_path):
    import sentencepiece as spm

    args = TransformerArgs(max_seqlen=64, **{**CONFIGS["mha-untied"], "vocab_size": 400})
    out = hf.export_hf(LLAMA, Transformer.build(args).state_dict(), args, tmp_path, "sp", str(sp_model))
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert hf.hf_tokenizer(out) == ("sp", str(out / "tokenizer.model"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ours = SentencePieceTokenizer(str(sp_model))
    rng = random.Random(1)
    fuzz = ["".join(rng.choice("ab  \n1.é🙂") for _ in range(30)) for _ in range(100)]
    only_model = tmp_path / "only_model"  # what a loader sees without tokenizer.json: converted from tokenizer.model
    only_model.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (only_model / name).write_bytes((out / name).read_bytes())
    for tok in map(transformers.AutoTokenizer.from_pretrained, (out, only_model)):
        for s in STRINGS + fuzz:
            ids = tok(s)["input_ids"]
            assert ids == [sp.bos_id()] + sp.encode(s), s  # BOS first, as lingua trains; no EOS
            assert ids == ours.encode(s, add_bos=True, add_eos=False), s
            assert tok.decode(ids, skip_special_tokens=True) == s
    # The one known difference: a literal '▁' (sentencepiece's space mark). transformers and raw sentencepiece read
    # it as a space; lingua's tokenizer encodes it as its UTF-8 bytes, so that decoding gives '▁' back.
    s = "a\u2581b"
    assert tok(s)["input_ids"] == [1] + sp.encode(s)
    assert ours.encode(s, add_eos=False) != tok(s)["input_ids"] and ours.decode(ours.encode(s)) == s


def test_bytes_tokenizer_export_matches_lingua(tmp_path):
    args = TransformerArgs(max_seqlen=64, **{**CONFIGS["mha-untied"], "vocab_size": 258})
    out = hf.export_hf(LLAMA, Transformer.build(args).state_dict(), args, tmp_path, "bytes")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = ByteTokenizer()
    for s in STRINGS + ["a\u2581b", "\x00\x7f"]:
        ids = tok(s)["input_ids"]
        assert ids == ours.encode(s, add_bos=True, add_eos=False), s
        assert tok.decode(ids, skip_special_tokens=True) == s
    assert (tok.bos_token_id, tok.eos_token_id) == (256, 257)
    assert hf.hf_tokenizer(out) == ("bytes", None)


# ---------------------------------------------------------------- training and the CLI on real checkpoints


def _train(corpus, dump_dir, **extra) -> dict:
    return train(load_config(TrainArgs, tiny_overrides(corpus, dump_dir, **extra)), TRANSFORMER_SPEC)


def _tiny_args() -> TransformerArgs:
    """The model tiny_overrides trains."""
    return TransformerArgs(dim=32, n_layers=2, n_heads=4, vocab_size=258, max_seqlen=64, mask="block_causal")


@pytest.fixture(scope="module")
def trained_ckpt(tiny_corpus, tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("run")
    _train(tiny_corpus, dump, steps=2)
    return list_checkpoints(dump / "checkpoints")[-1]


def test_init_ckpt_path_starts_training_from_hf_weights(tiny_corpus, tmp_path):
    model = Transformer.build(_tiny_args())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # weights no init could give
    hf.export_hf(LLAMA, model.state_dict(), _tiny_args(), tmp_path / "hf", "bytes")
    # lr=0: the run's checkpoint must hold exactly the Hugging Face weights it started from
    _train(tiny_corpus, tmp_path / "run", steps=1, optim__lr=0.0,
           checkpoint__init_ckpt_path=str(tmp_path / "hf"))
    trained = Transformer.build(_tiny_args())
    load_model_weights(str(list_checkpoints(tmp_path / "run" / "checkpoints")[-1]), trained)
    for (k, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), k


def test_export_cli_end_to_end_on_a_trained_checkpoint(trained_ckpt, tmp_path):
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "apps.main.export_hf", f"ckpt_dir={trained_ckpt}", f"out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "exported" in proc.stdout
    ours = Transformer.build(_tiny_args())
    load_model_weights(str(trained_ckpt), ours)
    theirs = load_hf(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("ROMEO: the king hath")["input_ids"]])
    assert ids[0, 0].item() == ByteTokenizer.bos_id
    with torch.no_grad():
        assert (ours.eval()(ids) - theirs(ids).logits).abs().max() < 1e-4
    assert torch.equal(greedy(ours, ids, 16), theirs.generate(ids, max_new_tokens=16, do_sample=False,
                                                              eos_token_id=None, pad_token_id=0))

    # a consolidated checkpoint exports the same tensors
    consolidated = consolidate(str(trained_ckpt), str(tmp_path / "consolidated"))
    out2 = export_app.main(export_app.ExportArgs(ckpt_dir=str(consolidated.parent), out=str(tmp_path / "hf2")))
    a, b = hf.read_hf_tensors(out), hf.read_hf_tensors(out2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    from lingua.args import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(export_app.main, export_app.ExportArgs, [f"ckpt_dir={tmp_path / 'missing'}", f"out={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / ".metadata").touch()
    with pytest.raises(LinguaError, match="no params.json"):
        export_app.main(export_app.ExportArgs(ckpt_dir=str(tmp_path / "ckpt"), out=str(tmp_path / "out")))


@pytest.mark.slow
def test_init_ckpt_path_from_hf_under_fsdp(tiny_corpus, tmp_path):
    """Two FSDP ranks (torchrun, gloo on CPU) each load the Hugging Face files and keep their own shards."""
    model = Transformer.build(_tiny_args())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    hf.export_hf(LLAMA, model.state_dict(), _tiny_args(), tmp_path / "hf")
    overrides = tiny_overrides(tiny_corpus, tmp_path / "run", steps=1, optim__lr=0.0, distributed__dp_shard=2,
                               checkpoint__init_ckpt_path=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "apps.main.train", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "dp=2" in log and "initialised weights from" in log, log[-3000:]
    trained = Transformer.build(_tiny_args())
    load_model_weights(str(list_checkpoints(tmp_path / "run" / "checkpoints")[-1]), trained)
    for (k, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("switch, message", [
    (dict(mlp="relu2"), r"\(LlamaForCausalLM: model.mlp=relu2 \(its MLP is swiglu\)\): export refused"),
    (dict(logit_softcap=15.0), r"\(LlamaForCausalLM: model.logit_softcap \(it has no logit soft-cap\)\)"),
    (dict(qk_norm=True), r"\(LlamaForCausalLM: model.qk_norm=true \(it has no QK-norm\)\)")])
def test_a_native_class_never_approximates(switch, message, tmp_path):
    """Llama alone cannot express these switches: one line naming the switch, and nothing written."""
    args = TransformerArgs(**{**CONFIGS["mha-untied"], **switch})
    with pytest.raises(LinguaError, match=message) as e:
        hf.export_hf(LLAMA, Transformer.build(args).state_dict(), args, tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_a_native_export_over_a_remote_code_one_leaves_no_code_behind(tmp_path):
    for name in ("debug-recipe-remote", "relu2-arcee"):
        model, args = make_model(name)
        hf.export_hf(TRANSFORMER_HF, model.state_dict(), args, tmp_path)
    assert not list(tmp_path.glob("*_lingua.py"))
    assert type(load_hf(tmp_path)).__name__ == "ArceeForCausalLM"
