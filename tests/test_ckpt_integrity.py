"""Checkpoints are never silently wrong: every file is checksummed in COMPLETE and verified by resume, eval, export
and init_ckpt_path; a corrupt one stops the run in one line, or is set aside (never deleted) when asked."""

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lingua.args import load_config
from lingua.checkpoint.integrity import (
    CorruptCheckpoint,
    file_sha256,
    gather_checksums,
    verify,
    write_complete,
)
from lingua.checkpoint.manager import list_checkpoints
from lingua.checkpoint.weights import consolidate, load_model_weights
from lingua.errors import LinguaError
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, train
from tests.conftest import read_jsonl, tiny_overrides
from tests.dist_helpers import free_port


def _run(corpus, dump_dir, **extra):
    return train(load_config(TrainArgs, tiny_overrides(corpus, dump_dir, eval__at_end=False, **extra)),
                 TRANSFORMER_SPEC)


def _flip(path, n=64):
    """Flip n bytes in the middle of a file, keeping its size (what a bad disk or copy does)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_everywhere_and_fallback_is_opt_in(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    _run(tiny_corpus, run, steps=8, checkpoint__dump__every=4, checkpoint__dump__keep=1)
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["0000000008"]  # keep=1 deleted 4 once 8 was hashed
    _run(tiny_corpus, run, steps=12, checkpoint__dump__every=4, checkpoint__dump__keep=2)
    c8, c12 = list_checkpoints(ckpts)
    marker = json.loads((c12 / "COMPLETE").read_text())
    assert marker["step"] == 12 and {".metadata", "__0_0.distcp", "params.json", "kinds.json",
                                     "train_state_00000.json"} <= set(marker["sha256"])
    shard = c12 / "__0_0.distcp"
    size = shard.stat().st_size
    _flip(shard)
    assert shard.stat().st_size == size
    # resume: one line naming the file (tests/test_bad_inputs.py runs it as a real process), nothing deleted
    with pytest.raises(CorruptCheckpoint) as e:
        _run(tiny_corpus, run, steps=16, checkpoint__dump__every=4, checkpoint__dump__keep=1)
    assert str(shard) in str(e.value) and "fallback_on_corrupt" in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in list_checkpoints(ckpts)] == ["0000000008", "0000000012"]
    # eval/export (consolidate) and init_ckpt_path read through the same verification
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp"):
        consolidate(str(c12), str(tmp_path / "out"))
    with pytest.raises(LinguaError, match="__0_0.distcp"):
        _run(tiny_corpus, tmp_path / "fresh", steps=1, checkpoint__init_ckpt_path=str(c12))
    from lingua.eval.load import load_model

    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp"):
        load_model(run)
    # asked to, the run sets the corrupt one aside and resumes from 8; the corrupt one is still on disk
    result = _run(tiny_corpus, run, steps=16, checkpoint__dump__every=4, checkpoint__dump__keep=1,
                  checkpoint__fallback_on_corrupt=True)
    assert result["step"] == 16
    assert [p.name for p in list_checkpoints(ckpts)] == ["0000000016"]
    aside = ckpts / "0000000012.corrupt"
    assert (aside / "COMPLETE").is_file() and (aside / "__0_0.distcp").stat().st_size == size
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 16
    load_model_weights(str(list_checkpoints(ckpts)[-1]), _tiny_model())  # the new one verifies


def _tiny_model():
    import torch

    from lingua.models.decoder import materialize
    from lingua.models.transformer.model import Transformer, TransformerArgs

    with torch.device("meta"):
        model = Transformer(TransformerArgs(dim=32, n_layers=2, n_heads=4, vocab_size=258, max_seqlen=64))
    return materialize(model, torch.device("cpu"), seed=0)


def test_a_missing_or_garbage_train_state_is_one_line(tiny_corpus, tmp_path):
    _run(tiny_corpus, tmp_path, steps=2, checkpoint__dump__every=2)
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    marker = json.loads((ckpt / "COMPLETE").read_text())
    (ckpt / "COMPLETE").write_text("2\n")  # a checkpoint from before checksums: loads unverified ...
    assert verify(ckpt) is False
    state = ckpt / "train_state_00000.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "scheduler"}))
    with pytest.raises(LinguaError, match=r"train state '.*train_state_00000.json' has no 'scheduler'"):
        _run(tiny_corpus, tmp_path, steps=4)
    state.write_bytes(b"\x00garbage{")
    with pytest.raises(LinguaError, match=r"cannot read train state '.*train_state_00000.json'"):
        _run(tiny_corpus, tmp_path, steps=4)
    (ckpt / "COMPLETE").write_text(json.dumps(marker))  # ... while with checksums the change is caught first
    with pytest.raises(CorruptCheckpoint, match="train_state_00000.json does not match"):
        _run(tiny_corpus, tmp_path, steps=4)


def test_a_file_listed_in_complete_but_missing_is_refused_by_name(tiny_corpus, tmp_path):
    from lingua.checkpoint.integrity import verify

    _run(tiny_corpus, tmp_path, steps=2, checkpoint__dump__every=2)
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert verify(ckpt) is True
    for name in ("__0_0.distcp", "params.json", ".metadata"):
        data = (ckpt / name).read_bytes()
        (ckpt / name).unlink()
        with pytest.raises(CorruptCheckpoint, match=rf"^corrupt checkpoint: .*/{name} is missing$"):
            verify(ckpt)
        (ckpt / name).write_bytes(data)
    assert verify(ckpt) is True


def _verify_on(rank: int, size: int, port: int, folder: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        # rank 1's shard was hashed already (as the async save's hashing thread does): its value is taken as given
        known = {"__1_0.distcp": "hashed-off-thread"} if rank == 1 else None
        out[f"gathered by {rank}"] = gather_checksums(Path(folder) / "saved", rank, known)
        out[f"whole, by {rank}"] = verify(Path(folder) / "whole")  # every rank: nothing bad in any share
        verify(Path(folder))
        out[rank] = "verified"
    except CorruptCheckpoint as e:
        out[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_every_rank_refuses_a_file_that_only_another_rank_hashed(tmp_path):
    """Under a process group rank r hashes the sorted names[r::world]: a bad file in rank 1's share stops rank 0 too."""
    names = ["a.distcp", "b.distcp", "c.distcp", "d.distcp"]
    for n in names:
        (tmp_path / n).write_bytes(n.encode() * 100)
    write_complete(tmp_path, 5, {n: file_sha256(tmp_path / n) for n in names})
    (tmp_path / "b.distcp").write_bytes(b"garbage")  # names[1::2] = b, d: rank 1's share
    # a save's files: each rank hashes its own shards and train state (rank 0 also .metadata), rank 0 gets them all
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "train_state_00000.json", "train_state_00001.json",
                 ".metadata", "params.json"):  # params.json: rank 0's, hashed by write_complete, not here
        (saved / name).write_bytes(name.encode())
    whole = tmp_path / "whole"
    whole.mkdir()
    for n in names:
        (whole / n).write_bytes(n.encode())
    write_complete(whole, 5, {n: file_sha256(whole / n) for n in names})
    out = mp.Manager().dict()
    mp.spawn(_verify_on, args=(2, free_port(), str(tmp_path), out), nprocs=2)
    msg = f"corrupt checkpoint: {tmp_path / 'b.distcp'} does not match the checksum recorded when it was saved"
    sha = {n: file_sha256(saved / n) for n in ("__0_0.distcp", "__0_1.distcp", "train_state_00000.json",
                                                "train_state_00001.json", ".metadata")}
    assert dict(out) == {0: msg, 1: msg, "gathered by 0": {**sha, "__1_0.distcp": "hashed-off-thread"},
                         "gathered by 1": {}, "whole, by 0": True, "whole, by 1": True}
