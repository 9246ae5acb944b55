import importlib.util
import io
import json
import re
import time

import numpy as np
import pytest
import torch

from lingua.errors import LinguaError
from lingua.train.metrics import (
    TRAIN_KEYS,
    LoggingArgs,
    MetricLogger,
    Progress,
    calibrate_matmul,
    format_console_line,
    gpu_table_peak,
    memory_gb,
    mfu,
    peak_flops,
)
from tests.conftest import read_jsonl


def _row(step):
    return dict(
        step=step,
        tokens_seen=step * 1024,
        loss=torch.tensor(3.5 - 0.01 * step),
        lr=np.float32(3e-4),
        grad_norm=0.75,
        tok_per_s=12345.6,
        mfu=0.42,
        step_ms=310.0,
        data_ms=2.5,
        mem_gb=1.25,
        train_s=3.5,
    )


def test_metrics_jsonl(tmp_path):
    with MetricLogger(tmp_path / "run", LoggingArgs()) as logger:
        logger.log(_row(10))
        logger.log(_row(20))
        # flushed per line: readable while the run goes on
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
        logger.log_eval({"step": 20, "val/loss": 3.1, "val/bpb": 1.9})
        logger.log({**_row(30), "loss": float("nan")})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert [r["step"] for r in rows] == [10, 20, 30]
    for r in rows:
        assert set(TRAIN_KEYS) <= set(r)
    assert rows[0]["loss"] == pytest.approx(3.4) and rows[0]["tokens_seen"] == 10240
    assert rows[0]["lr"] == pytest.approx(3e-4) and rows[1]["mfu"] == 0.42
    assert rows[2]["loss"] is None  # nan -> null
    eval_rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.eval.jsonl").read_text().splitlines()]
    assert eval_rows == [{"step": 20, "val/loss": 3.1, "val/bpb": 1.9}]

    # a resumed run appends to the same file
    with MetricLogger(tmp_path / "run", LoggingArgs()) as logger:
        logger.log(_row(40))
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_only_rank0_writes(tmp_path):
    with MetricLogger(tmp_path / "run", LoggingArgs(), rank=1) as logger:
        logger.log(_row(10))
        logger.log_eval({"step": 10})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", [pytest.param("wandb", marks=pytest.mark.slow), "tensorboard"])  # wandb: ~15 s
def test_optional_backends(tmp_path, monkeypatch, backend):
    args = LoggingArgs(**{backend: True})
    if importlib.util.find_spec(backend) is None:
        with pytest.raises(LinguaError, match=rf"pip install -e '\.\[{backend}\]'"):
            MetricLogger(tmp_path, args)
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricLogger(tmp_path, args, run_name="t", config_dict={"a": 1}) as logger:
        for step in (1, 2, 3):
            logger.log(_row(step))
        logger.log_eval({"step": 3, "alpha/bpb": 2.0, "alpha/tokens": 100, "alpha/bytes": 300})
    # the JSON files are written alongside the backend, as plain numbers
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (s, pytest.approx(3.5 - 0.01 * s, rel=1e-6)) for s in (1, 2, 3)]  # the loss is a float32 tensor
    assert read_jsonl(tmp_path / "metrics.eval.jsonl") == [{"step": 3, "alpha/bpb": 2.0, "alpha/tokens": 100,
                                                            "alpha/bytes": 300}]
    series = _read_wandb(tmp_path) if backend == "wandb" else _read_tensorboard(tmp_path / "tensorboard")
    for key in ("loss", "lr", "tok_per_s"):
        assert series[key] == [(s, pytest.approx(float(_row(s)[key]), rel=1e-6)) for s in (1, 2, 3)], key
    assert series["eval/alpha/bpb"] == [(3, 2.0)]
    assert not {"eval/alpha/tokens", "eval/alpha/bytes"} & set(series)  # counts, not metrics


def _read_tensorboard(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _read_wandb(dump_dir) -> dict:
    """The history of the offline run: its .wandb file is a LevelDB-style log (32 KiB blocks of chunks with a 7-byte
    header: crc, length, type) of protobuf Records after a 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = dump_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, buf, series = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for k, v in row.items():
                    if not k.startswith("_"):
                        series.setdefault(k, []).append((row["_step"], v))
    return series


def test_console_line_has_the_numbers():
    line = format_console_line(_row(120))
    for text in ("step 120", "loss 2.3000", "lr 3.00e-04", "gnorm 0.750", "12.35k tok/s", "MFU 42.0%", "310 ms/step",
                 "data 2.5 ms", "mem 1.25 GB"):
        assert text in line, (text, line)
    assert "\n" not in line
    assert format_console_line({"step": 3, "loss": float("nan")}) == "step 3 | loss nan"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    out = io.StringIO()
    p = Progress(total=100, stream=out)
    p.update(50)
    p.close()
    assert out.getvalue() == ""

    tty = _Tty()
    p = Progress(total=100, stream=tty)
    time.sleep(0.2)
    p.update(50, suffix="loss 2.1")
    drawn = tty.getvalue()
    assert "50/100" in drawn and " 50%" in drawn and "loss 2.1" in drawn
    p.write("a console line")
    assert "a console line\n" in tty.getvalue()
    p.update(100)
    p.close()
    assert "100/100" in tty.getvalue() and tty.getvalue().endswith("\n")
    assert Progress(total=10, stream=_Tty(), enabled=False).enabled is False  # logging.progress=false
    # tests/test_console.py runs the real loop in a pseudo-terminal


def test_calibration_is_time_boxed_and_positive():
    t = time.perf_counter()
    flops, source = calibrate_matmul(torch.float32, time_box_s=0.5)
    elapsed = time.perf_counter() - t
    assert elapsed < 0.5 + 1.0, elapsed  # one extra sample at most, plus slack for a shared machine
    assert 1e8 < flops < 1e14, flops  # between 0.1 GFLOP/s and 100 TFLOP/s on any CPU
    # the size starts at 1024 and halves until one matmul fits in a quarter of the box (a slow or loaded CPU)
    m = re.match(r"calibrated: (\d+)\^3 fp32 matmul, best of (\d+)", source)
    assert m and int(m.group(1)) in (64, 128, 256, 512, 1024), source
    assert int(m.group(2)) >= 2


def test_peak_flops_sources():
    assert peak_flops(torch.device("cpu"), torch.float32, override=3e12) == (3e12, "logging.peak_flops override")
    assert gpu_table_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == (989e12, "table: H100 SXM bf16")
    assert gpu_table_peak("NVIDIA H100 PCIe", torch.bfloat16) == (756e12, "table: H100 PCIe bf16")
    assert gpu_table_peak("NVIDIA A100-SXM4-80GB", torch.float32)[0] == 19.5e12  # not the A10
    assert gpu_table_peak("NVIDIA A10G", torch.bfloat16)[1] == "table: A10G bf16"
    assert gpu_table_peak("NVIDIA L40S", torch.bfloat16)[1] == "table: L40S bf16"  # not the L4
    assert gpu_table_peak("NVIDIA L4", torch.bfloat16)[0] == 121e12
    assert gpu_table_peak("Tesla V100-SXM2-16GB", torch.bfloat16) == (15.7e12, "table: V100 fp32 (no native bf16)")
    assert gpu_table_peak("NVIDIA GeForce RTX 4090", torch.float32)[0] == 82.6e12
    assert gpu_table_peak("Some Future GPU", torch.bfloat16) is None
    # exact words: GH200 is not an H200 (same peak, its own label), the H20 is not an H200, A800 is an A100's twin
    assert gpu_table_peak("NVIDIA GH200 480GB", torch.bfloat16) == (989e12, "table: GH200 bf16")
    assert gpu_table_peak("NVIDIA H20", torch.bfloat16) == (148e12, "table: H20 bf16")
    assert gpu_table_peak("NVIDIA H200", torch.bfloat16)[1] == "table: H200 bf16"
    assert gpu_table_peak("NVIDIA H800", torch.bfloat16) == (989e12, "table: H800 SXM bf16")
    assert gpu_table_peak("NVIDIA A800-SXM4-80GB", torch.bfloat16) == (312e12, "table: A800 bf16")
    assert gpu_table_peak("NVIDIA B200", torch.bfloat16) == (2.25e15, "table: B200 bf16")
    assert gpu_table_peak("NVIDIA GB200", torch.bfloat16) == (2.5e15, "table: GB200 bf16")
    assert gpu_table_peak("AMD Instinct MI300X", torch.bfloat16) == (1307.4e12, "table: MI300X bf16")
    assert gpu_table_peak("NVIDIA A10", torch.bfloat16)[1] == "table: A10 bf16"


def test_memory_row_from_cuda_allocator_stats_and_cpu_keys():
    from lingua.train.metrics import cuda_memory_row, memory_window

    stats = {"allocated_bytes.all.peak": 3 * 2**30, "reserved_bytes.all.peak": 5 * 2**30, "num_alloc_retries": 2}
    assert cuda_memory_row(stats) == {"mem_gb": 3.0, "mem_reserved_gb": 5.0, "alloc_retries": 2}
    row = memory_window(torch.device("cpu"))  # CPU: RSS only; the allocator keys are absent, not null
    with open("/proc/self/status") as f:
        vm_rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))
    # the RSS in GiB, read a moment apart: 4 MiB leaves room for what the interpreter allocates in between
    assert set(row) == {"mem_gb"} and row["mem_gb"] == pytest.approx(vm_rss_kib / 2**20, abs=4 / 1024)


def test_mfu():
    assert mfu(6e9, 1000.0, 12e12) == pytest.approx(0.5)
    assert mfu(6e9, 1000.0, 0.0) == 0.0


def test_memory_gb_is_this_process_rss():
    before = memory_gb(torch.device("cpu"))
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = memory_gb(torch.device("cpu"))
    assert 0.01 < before < 64
    # 64 MiB = 1/16 GiB more; 0.03 GiB for what else the allocator maps or returns meanwhile (RSS moves in whole
    # arenas), still half the signal: a reading in MiB or of the wrong process would fall outside it
    assert after - before == pytest.approx(1 / 16, abs=0.03)
    del big


def test_an_unknown_gpu_logs_no_mfu():
    from lingua.train.loop import ThroughputWindow

    window = ThroughputWindow(flops_per_token=1e6, peak=None, world_size=1)  # peak_flops' answer for such a GPU
    window.add(1000, 0.0)
    assert window.metrics()["mfu"] is None and window.metrics()["tok_per_s"] > 0
    assert format_console_line({"step": 1, "mfu": None}) == "step 1"
