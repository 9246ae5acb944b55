"""Train a sentencepiece BPE tokenizer on a prepared source's training chunks.

    python setup/train_tokenizer.py --data_dir data --source shakespeare --vocab_size 4096
    # -> tokenizers/shakespeare_sp4096.model (+ .vocab, and .json with the settings and the val bytes per token)

Use it with `data.tokenizer.name=sp data.tokenizer.path=tokenizers/shakespeare_sp4096.model`.

The model round-trips any text exactly: identity normalisation, whitespace kept as is (no dummy prefix, no collapsing
of spaces), byte fallback for characters outside the vocabulary. Documents are fed paragraph by paragraph with their
newlines, so the vocabulary learns pieces such as ".\\n" instead of spending one byte token per newline.

Idempotent: when the model exists with the same settings it is not retrained (the val ratio is printed again).
Atomic: the files are written under temporary names and renamed into place.
"""

import argparse
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from lingua.data.jsonl import chunk_files, read_lines  # noqa: E402
from lingua.data.tokenizer import SentencePieceTokenizer  # noqa: E402
from lingua.errors import LinguaError, exit_on_error  # noqa: E402

MAX_PIECE_CHARS = 4000  # sentencepiece skips "sentences" longer than max_sentence_length bytes; we split first


def training_pieces(files, max_bytes: int):
    """Paragraphs (split at blank lines, newlines kept) of the documents in `files`, at most max_bytes in all."""
    total = 0
    for path in files:
        for text, _ in read_lines(path, "chunk file"):
            paragraphs = text.split("\n\n")
            for i, para in enumerate(paragraphs):
                para = para + "\n\n" if i + 1 < len(paragraphs) else para
                while para:
                    cut = len(para) if len(para) <= MAX_PIECE_CHARS else para.rfind(" ", 0, MAX_PIECE_CHARS) + 1
                    cut = cut if cut > 0 else MAX_PIECE_CHARS
                    piece, para = para[:cut], para[cut:]
                    total += len(piece.encode("utf-8"))
                    yield piece
                    if total >= max_bytes:
                        return


def bytes_per_token(model_path: str, val_path: str, max_docs: int = 1000) -> float:
    tok = SentencePieceTokenizer(model_path)
    n_bytes = n_tokens = 0
    for i, (text, _) in enumerate(read_lines(val_path, "validation file")):
        if i >= max_docs:
            break
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tok.encode(text, add_bos=False, add_eos=False))
    return n_bytes / max(n_tokens, 1)


def train(data_dir: str, source: str, vocab_size: int, out: str, max_bytes: int) -> dict:
    import sentencepiece as spm

    files = chunk_files(data_dir, source)
    val = os.path.join(data_dir, source, f"{source}.val.jsonl")
    out_path = Path(out)
    meta_path = out_path.with_suffix(".json")
    settings = {"data_dir": str(Path(data_dir).resolve()), "source": source, "vocab_size": vocab_size,
                "max_bytes": max_bytes, "model_type": "bpe", "byte_fallback": True}
    if out_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            print(f"[tokenizer] {out} exists with the same settings (delete it to retrain): "
                  f"{meta['val_bytes_per_token']:.3f} bytes/token on {source} val")
            return meta
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    print(f"[tokenizer] training a {vocab_size}-piece BPE on {source} ({len(files)} chunk files) ...", flush=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_pieces(files, max_bytes), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=4 * MAX_PIECE_CHARS + 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=min(os.cpu_count() or 1, 8),
            input_sentence_size=5_000_000, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:
        raise LinguaError(f"sentencepiece training failed: {str(e).strip().splitlines()[-1]}") from None
    tmp_model = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp_model.write_bytes(model.getvalue())
    try:
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
        out_path.with_suffix(".vocab").write_text(vocab, encoding="utf-8")
        ratio = bytes_per_token(str(tmp_model), val) if os.path.isfile(val) else float("nan")
        meta = {"settings": settings, "n_words": sp.vocab_size(), "val_bytes_per_token": ratio}
        os.replace(tmp_model, out_path)
    finally:
        tmp_model.unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")  # last: its presence means the model is complete
    print(f"[tokenizer] wrote {out} ({sp.vocab_size()} pieces): {ratio:.3f} bytes/token on {source} val")
    return meta


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--source", default="shakespeare")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--out", default=None, help="model file (default: tokenizers/<source>_sp<vocab_size>.model)")
    parser.add_argument("--max_bytes", type=int, default=200_000_000, help="train on at most this much text")
    args = parser.parse_args(argv)
    if args.vocab_size < 260:
        raise LinguaError(f"--vocab_size must be >= 260 (256 byte pieces + specials), got {args.vocab_size}")
    out = args.out or f"tokenizers/{args.source}_sp{args.vocab_size}.model"
    if not out.endswith(".model"):
        raise LinguaError(f"--out {out}: the model file name must end with .model")
    if not os.path.isdir(args.data_dir):
        raise LinguaError(f"--data_dir {args.data_dir} does not exist (run setup/prepare_data.py first)")
    return train(args.data_dir, args.source, args.vocab_size, out, args.max_bytes)


if __name__ == "__main__":
    exit_on_error(main)()
