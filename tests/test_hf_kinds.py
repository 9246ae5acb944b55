"""Hugging Face export, end to end, for each kind the exporter writes: a trained checkpoint goes through
`apps.main.export_hf`, and transformers (remote code where needed), its tokenizer, `generate` and `lm_eval --model hf`
give what lingua gives; the export comes back into lingua for eval, generation and training. Offline: tiny models
trained here, a sentencepiece model trained here (conftest.py's sp_model). tests/test_hf.py has the unit tests."""

import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import hf_offline_env

hf_offline_env()  # before transformers is imported
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from apps.fastRNN.model import FASTRNN_SPEC, FastRNN, FastRNNArgs  # noqa: E402
from apps.mamba.model import MAMBA_SPEC, Mamba, MambaArgs  # noqa: E402
from apps.moe.model import MOE_SPEC, MoEArgs, MoETransformer  # noqa: E402
from apps.mtp.model import MTP_SPEC, MTPArgs, MTPTransformer  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.checkpoint.manager import list_checkpoints  # noqa: E402
from lingua.eval.generate import Generator, GeneratorArgs  # noqa: E402
from lingua.eval.load import load_model  # noqa: E402
from lingua.hf import io as hf  # noqa: E402
from lingua.hf.mapping import choose  # noqa: E402
from lingua.models.transformer.model import Transformer, TransformerArgs  # noqa: E402
from lingua.models.transformer.spec import TRANSFORMER_HF, TRANSFORMER_SPEC  # noqa: E402
from lingua.errors import LinguaError  # noqa: E402
from lingua.train.loop import TrainArgs, train  # noqa: E402
from tests.conftest import ROOT, tiny_overrides  # noqa: E402

# apps/main/configs/debug.yaml's switches: ReLU² MLP, QK-norm, tied embeddings (no native class has all three)
DEBUG_SWITCHES = dict(model__mlp="relu2", model__qk_norm=True, model__weight_tying=True)
PROMPTS = ["ROMEO: the king", "JULIET:"]


def sp_overrides(corpus, dump, sp_model, **extra) -> list[str]:
    return tiny_overrides(corpus, dump, model__vocab_size=400, data__tokenizer__name="sp",
                          data__tokenizer__path=str(sp_model), eval__at_end=False, **extra)


@pytest.fixture(scope="module")
def debug_ckpt(tiny_corpus, sp_model, tmp_path_factory):
    dump = tmp_path_factory.mktemp("debug_run")
    train(load_config(TrainArgs, sp_overrides(tiny_corpus, dump, sp_model, steps=4, **DEBUG_SWITCHES)),
          TRANSFORMER_SPEC)
    return list_checkpoints(dump / "checkpoints")[-1]


@pytest.fixture(scope="module")
def debug_export(debug_ckpt, tmp_path_factory):
    """The debug recipe's checkpoint through the export command line; (out dir, its output)."""
    out = tmp_path_factory.mktemp("debug_hf") / "hf"
    proc = subprocess.run([sys.executable, "-m", "apps.main.export_hf", f"ckpt_dir={debug_ckpt}", f"out={out}"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout + proc.stderr


def hf_greedy(model, tok, prompts: list[str], n: int) -> list[list[int]]:
    """The new tokens of transformers' batched greedy `generate` (left padding), cut at EOS as lingua's Generator."""
    tok.pad_token, tok.padding_side = tok.unk_token or tok.eos_token, "left"  # pad ids are masked out anyway
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[:, batch["input_ids"].shape[1]:]
    return [row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in out.tolist()]


def lingua_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence (no cache): the reference."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == eos:
                return seq[len(ids):-1]
    return seq[len(ids):]


def export_and_compare(mappings, model, args, out, architecture: str):
    """Export `model` (bytes tokenizer), load it in transformers as `architecture`; its logits must be ours."""
    hf.export_hf(mappings, model.state_dict(), args, out, "bytes")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(theirs).__name__ == architecture
    tokens = torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - theirs(tokens).logits).abs().max() < 1e-4
    return theirs, tokens


def assert_comes_back(mappings, model, out, again):
    """lingua loads the export (eval and generate take it) with our exact weights, and writes the same bytes again."""
    back, back_args, tok = load_model(str(out))
    assert type(back) is type(model) and tok.n_words == 258
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    hf.export_hf(mappings, back.state_dict(), back_args, again, "bytes")
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    return back_args


@pytest.mark.slow  # its fixtures train and export through the command line (~20 s)
def test_debug_recipe_exports_as_remote_code_and_matches_lingua(debug_ckpt, debug_export):
    out, log = debug_export
    assert "LinguaForCausalLM" in log and "trust_remote_code" in log  # the path taken, and why
    assert "ArceeForCausalLM: model.qk_norm=true" in log
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_lingua.LinguaForCausalLM"
    assert (cfg["mlp"], cfg["qk_norm"], cfg["tie_word_embeddings"]) == ("relu2", True, True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(theirs).__name__ == "LinguaForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # it reads config.json too
    ours, _, our_tok = load_model(str(debug_ckpt))
    for s in PROMPTS + ["thou art the night, and  I", "café 123"]:
        assert tok(s)["input_ids"] == our_tok.encode(s, add_bos=True, add_eos=False), s
    tokens = torch.randint(0, 400, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max() < 1e-4
    # greedy decoding, batched with left padding: token for token, and the text lingua's Generator (KV cache) gives
    their_ids = hf_greedy(theirs, tok, PROMPTS, 20)
    for prompt, ids in zip(PROMPTS, their_ids):
        assert ids == lingua_greedy(ours, our_tok.encode(prompt, add_eos=False), 20, our_tok.eos_id), prompt
    expected, _ = Generator(ours, our_tok, GeneratorArgs(max_gen_len=20)).generate(PROMPTS)
    assert [our_tok.decode(ids) for ids in their_ids] == expected


@pytest.mark.slow
def test_debug_recipe_export_comes_back_for_eval_generate_and_training(debug_ckpt, debug_export, tiny_corpus,
                                                                        sp_model, tmp_path):
    out, _ = debug_export
    ours, _, our_tok = load_model(str(debug_ckpt))
    back, back_args, back_tok = load_model(str(out))  # the HF directory, its tokenizer.model
    assert (back_args.mlp, back_args.qk_norm, back_args.weight_tying) == ("relu2", True, True)
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    args = GeneratorArgs(max_gen_len=12)
    assert Generator(back, back_tok, args).generate(PROMPTS)[0] == Generator(ours, our_tok, args).generate(PROMPTS)[0]
    # export -> import -> export: the same bytes
    again = hf.export_hf(TRANSFORMER_HF, back.state_dict(), back_args, tmp_path / "again", "sp",
                         str(out / "tokenizer.model"))
    for name in ("model.safetensors", "config.json", "modeling_lingua.py", "tokenizer.model"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    # checkpoint.init_ckpt_path=<the export>: with lr 0 the run's weights are the export's
    train(load_config(TrainArgs, sp_overrides(tiny_corpus, tmp_path / "run", sp_model, steps=1, optim__lr=0.0,
                                              checkpoint__init_ckpt_path=str(out), **DEBUG_SWITCHES)),
          TRANSFORMER_SPEC)
    trained = load_model(str(tmp_path / "run"))[0]
    for (k, a), b in zip(ours.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_lm_eval_hf_on_the_export_equals_lingua_harness(debug_ckpt, debug_export, offline, tmp_path):
    """`lm_eval --model hf` (remote code) on the export scores a local task as lingua's own harness path does."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lingua.eval.harness import LinguaLM
    from tests.harness_helpers import write_task

    out, _ = debug_export
    include = write_task(tmp_path, n_docs=8)
    kwargs = dict(tasks=["lingua_local_mc"], log_samples=True, bootstrap_iters=0,
                  task_manager=TaskManager(include_path=include, include_defaults=False))
    model, _, tok = load_model(str(debug_ckpt))
    ours = lm_eval.simple_evaluate(model=LinguaLM(model, tok, batch_size=4), **kwargs)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=dict(pretrained=str(out), trust_remote_code=True,
                                                                 dtype="float32", add_bos_token=True, device="cpu"),
                                     batch_size=4, **kwargs)
    for key in ("acc,none", "acc_norm,none"):
        assert theirs["results"]["lingua_local_mc"][key] == ours["results"]["lingua_local_mc"][key], key
    lls = [[r[0][0] for r in s["resps"]] for s in ours["samples"]["lingua_local_mc"]]
    their_lls = [[r[0][0] for r in s["resps"]] for s in theirs["samples"]["lingua_local_mc"]]
    assert torch.allclose(torch.tensor(lls, dtype=torch.float64), torch.tensor(their_lls, dtype=torch.float64),
                          atol=1e-4)


# ---------------------------------------------------------------- multi-token prediction: the next-token head


@pytest.mark.parametrize("switches, architecture", [(dict(mlp="relu2", qk_norm=True, weight_tying=True),
                                                     "LinguaForCausalLM"), ({}, "LlamaForCausalLM")])
def test_mtp_exports_its_next_token_head_as_a_causal_lm(switches, architecture, tmp_path, caplog):
    args = MTPArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seqlen=64, n_future_head=3, **switches)
    model = MTPTransformer.build(args, seed=2).eval()
    with caplog.at_level("WARNING"):
        out = hf.export_hf(MTP_SPEC.hf, model.state_dict(), args, tmp_path / "hf")
    assert "the 2 extra head(s) (layers 3..4) are dropped" in caplog.text
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(theirs).__name__ == architecture and theirs.config.num_hidden_layers == 3
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - theirs(tokens).logits).abs().max() < 1e-4  # head 0's logits
    prompt = tokens[:1, :6]
    ids = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert ids == lingua_greedy(model, prompt[0].tolist(), 12, eos=-1)
    # back: the directory is a plain transformer for eval and generate; it starts an MTP run only with one head
    assert hf.args_from_hf(out, TRANSFORMER_HF).n_layers == 3
    one_head = MTPTransformer.build(dataclasses.replace(args, n_future_head=1))
    hf.load_hf_weights(out, one_head, MTP_SPEC.hf)
    with torch.no_grad():
        assert torch.equal(one_head.eval()(tokens), model(tokens))
    with pytest.raises(LinguaError, match="only with model.n_future_head=1 \\(got 3\\)"):
        hf.load_hf_weights(out, MTPTransformer.build(args), MTP_SPEC.hf)


# ---------------------------------------------------------------- README's table: what the exporter chooses

# (model, switches as the README names them, args); every row also holds with tied embeddings, GQA and any RoPE theta
TABLE_ROWS = [
    ("transformer", "SwiGLU", TransformerArgs()),
    ("transformer", "SwiGLU + QK-norm", TransformerArgs(qk_norm=True)),
    ("transformer", "ReLU²", TransformerArgs(mlp="relu2")),
    ("transformer", "ReLU² + QK-norm (apps/main/configs/debug.yaml)", TransformerArgs(mlp="relu2", qk_norm=True)),
    ("transformer", "any of the above + logit soft-cap", TransformerArgs(logit_softcap=30.0)),
    ("mtp", "SwiGLU; other switches as the transformer's rows (next-token head only)", MTPArgs(n_future_head=2)),
    ("moe", "softmax top-k gates, renormalised", MoEArgs()),
    ("moe", "sigmoid gates, no renormalisation, shared experts, selection bias, QK-norm, soft-cap",
     MoEArgs(gate="sigmoid")),
    ("mamba", "Mamba-2 mixers only", MambaArgs()),
    ("mamba", "with a SwiGLU MLP per block (model.mlp)", MambaArgs(mlp=True)),
    ("fastRNN", "mingru, minlstm, hawk (any switch)", FastRNNArgs()),
]
SPECS = {"transformer": TRANSFORMER_SPEC, "mtp": MTP_SPEC, "moe": MOE_SPEC, "mamba": MAMBA_SPEC,
         "fastRNN": FASTRNN_SPEC}


def export_table() -> str:
    lines = ["| model | switches | Hugging Face class | loads in |", "|---|---|---|---|"]
    for model, switches, args in TABLE_ROWS:
        try:
            m = choose(SPECS[model].hf, args)
            cls = f"`{m.architecture}`"
            where = "transformers, `trust_remote_code=True`" if m.remote_code else "transformers (native class)"
        except LinguaError:
            cls, where = "refused (one line)", "-"
        lines.append(f"| {model} | {switches} | {cls} | {where} |")
    return "\n".join(lines)


def test_readme_table_is_what_the_exporter_chooses():
    table = export_table()
    assert table in (ROOT / "README.md").read_text(), f"README's export table should read:\n{table}"


# ---------------------------------------------------------------- Mamba as Mamba2ForCausalLM


@pytest.mark.slow  # transformers' Mamba2 reference scan on CPU: ~6 s
def test_mamba_exports_as_mamba2_and_comes_back(tmp_path):
    args = MambaArgs(dim=32, n_layers=2, vocab_size=258, d_state=16, head_dim=16, chunk_size=8, max_seqlen=64,
                     weight_tying=True)
    model = Mamba.build(args, seed=1).eval()
    with torch.no_grad():  # norms start at 1 and D at 1: move them so a swapped name cannot go unnoticed
        gen = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", ".D")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    out = tmp_path / "hf"
    theirs, tokens = export_and_compare(MAMBA_SPEC.hf, model, args, out, "Mamba2ForCausalLM")
    prompt = tokens[:1, :6]
    ids = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert ids == lingua_greedy(model, prompt[0].tolist(), 12, eos=-1)
    assert_comes_back(MAMBA_SPEC.hf, model, out, tmp_path / "again")
    mlp = dataclasses.replace(args, mlp=True)
    with pytest.raises(LinguaError, match=r"\(Mamba2ForCausalLM: model.mlp=true \(its blocks are mixers only\)\)"):
        hf.export_hf(MAMBA_SPEC.hf, Mamba.build(mlp).state_dict(), mlp, tmp_path / "mlp")


# ---------------------------------------------------------------- generate and lm-eval on each class


def _kind(name: str):
    """(model, args, mappings) of a small random model that exports as `name`, on the bytes tokenizer."""
    small = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, max_seqlen=64)
    if name == "Mamba2ForCausalLM":
        args = MambaArgs(dim=32, n_layers=2, vocab_size=258, d_state=16, head_dim=16, chunk_size=8, max_seqlen=64)
        return Mamba.build(args, seed=3).eval(), args, MAMBA_SPEC.hf
    if name == "LinguaRNNForCausalLM":
        args = FastRNNArgs(dim=32, n_layers=2, vocab_size=258, max_seqlen=64, cell="hawk", n_heads=2)
        return FastRNN.build(args, seed=3).eval(), args, FASTRNN_SPEC.hf
    if name in ("MixtralForCausalLM", "LinguaMoEForCausalLM"):
        beyond = dict(gate="sigmoid", n_shared_experts=1) if name == "LinguaMoEForCausalLM" else {}
        args = MoEArgs(**small, n_experts=4, top_k=2, **beyond)
        return MoETransformer.build(args, seed=3).eval(), args, MOE_SPEC.hf
    switches = {"LlamaForCausalLM": {}, "Qwen3ForCausalLM": dict(qk_norm=True), "ArceeForCausalLM": dict(mlp="relu2"),
                "LinguaForCausalLM": dict(mlp="relu2", qk_norm=True, logit_softcap=5.0)}[name]
    args = TransformerArgs(**small, **switches)
    return Transformer.build(args, seed=3).eval(), args, TRANSFORMER_HF


@pytest.mark.slow  # an lm-eval run a class
@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Qwen3ForCausalLM", "ArceeForCausalLM", "MixtralForCausalLM",
                                  "Mamba2ForCausalLM", "LinguaForCausalLM", "LinguaMoEForCausalLM",
                                  "LinguaRNNForCausalLM"])
def test_each_class_generates_and_scores_lm_eval_like_lingua(name, offline, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lingua.data.tokenizer import ByteTokenizer
    from lingua.eval.harness import LinguaLM
    from tests.harness_helpers import write_task

    model, args, mappings = _kind(name)
    out = hf.export_hf(mappings, model.state_dict(), args, tmp_path / "hf", "bytes")
    assert json.loads((out / "config.json").read_text())["architectures"] == [name]
    remote = name.startswith("Lingua")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    prompt = torch.tensor([[256, 82, 79, 77]])  # BOS "ROM"
    ids = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    assert ids == lingua_greedy(model, prompt[0].tolist(), 10, eos=-1)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=dict(pretrained=str(out), dtype="float32",
                                                                 add_bos_token=True, device="cpu",
                                                                 trust_remote_code=remote),
                                     tasks=["lingua_local_mc"], log_samples=True, bootstrap_iters=0, batch_size=4,
                                     task_manager=TaskManager(include_path=write_task(tmp_path, n_docs=4),
                                                              include_defaults=False))
    # lingua's harness on the very requests lm-eval made (the full comparison through lm-eval: the debug test above)
    samples = theirs["samples"]["lingua_local_mc"]
    requests = [SimpleNamespace(args=tuple(a)) for s in samples for a in s["arguments"]]
    ours = [ll for ll, _ in LinguaLM(model, ByteTokenizer(), batch_size=4).loglikelihood(requests)]
    their_lls = [r[0][0] for s in samples for r in s["resps"]]
    assert len(ours) == len(their_lls) == 16
    assert torch.allclose(torch.tensor(ours, dtype=torch.float64), torch.tensor(their_lls, dtype=torch.float64),
                          atol=1e-4)


# ---------------------------------------------------------------- MoE beyond Mixtral: lingua's remote code


@pytest.mark.slow  # ~7 s
def test_moe_beyond_mixtral_exports_as_remote_code_and_comes_back(tmp_path):
    args = MoEArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, max_seqlen=64, n_experts=4, top_k=2,
                   gate="sigmoid", route_norm=False, n_shared_experts=1, bias_update_rate=0.01, qk_norm=True,
                   weight_tying=True, logit_softcap=5.0)
    model = MoETransformer.build(args, seed=4).eval()
    with torch.no_grad():  # a selection bias that changes which experts are chosen
        for layer in model.layers:
            layer.feed_forward.expert_bias.copy_(0.2 * torch.randn(4, generator=torch.Generator().manual_seed(1)))
    out = tmp_path / "hf"
    theirs, tokens = export_and_compare(MOE_SPEC.hf, model, args, out, "LinguaMoEForCausalLM")
    with torch.no_grad():
        theirs.model.layers[0].mlp.expert_bias.zero_()  # the bias matters: without it the logits move
        assert (model(tokens) - theirs(tokens).logits).abs().max() > 1e-3
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = tokens[:1, :6]
    ids = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert ids == lingua_greedy(model, prompt[0].tolist(), 12, eos=-1)
    back_args = assert_comes_back(MOE_SPEC.hf, model, out, tmp_path / "again")
    assert (back_args.gate, back_args.n_shared_experts, back_args.route_norm) == ("sigmoid", 1, False)


# ---------------------------------------------------------------- fastRNN: lingua's remote code


@pytest.mark.slow  # three cells, a batched generate each: ~6 s
@pytest.mark.parametrize("cell", ["mingru", "minlstm", "hawk"])
def test_fastrnn_exports_as_remote_code_and_comes_back(cell, tmp_path):
    from lingua.data.tokenizer import ByteTokenizer

    args = FastRNNArgs(dim=32, n_layers=2, vocab_size=258, max_seqlen=64, cell=cell, n_heads=2,
                       lru_dim_multiplier=1.5, weight_tying=cell == "minlstm")
    model = FastRNN.build(args, seed=1).eval()
    out = tmp_path / "hf"
    theirs, _ = export_and_compare(FASTRNN_SPEC.hf, model, args, out, "LinguaRNNForCausalLM")
    # batched greedy generation with left padding: the recurrent state starts at each row's first real token
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    their_ids = hf_greedy(theirs, tok, PROMPTS, 12)
    expected, _ = Generator(model, ByteTokenizer(), GeneratorArgs(max_gen_len=12)).generate(PROMPTS)
    assert [ByteTokenizer().decode(ids) for ids in their_ids] == expected
    assert_comes_back(FASTRNN_SPEC.hf, model, out, tmp_path / "again")
