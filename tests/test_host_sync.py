"""No host sync in a training step except at logging and save steps, for every shipped model: the steps run under
lingua/train/host_sync.py's detector (logging.check_host_syncs), which on CPU treats every tensor not made on
purpose on the host as a GPU tensor."""

import importlib

import pytest
import torch

from lingua.args import load_config
from lingua.errors import LinguaError
from lingua.train.host_sync import HostSyncDetector, watch
from lingua.train.loop import train, train_args_cls
from tests.golden.record import MODELS, TRAIN

SPECS = {"transformer": "lingua.models.transformer.spec:TRANSFORMER_SPEC", "mtp": "apps.mtp.model:MTP_SPEC",
         "fastRNN": "apps.fastRNN.model:FASTRNN_SPEC", "mamba": "apps.mamba.model:MAMBA_SPEC",
         "moe": "apps.moe.model:MOE_SPEC"}


def _spec(name):
    module, attr = SPECS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _events(fn) -> list[str]:
    with HostSyncDetector(cpu_as_device=True) as d:
        fn()
    return [what for what, _ in d.events]


def test_detector_names_each_kind_of_sync_and_spares_host_tensors():
    x = torch.randn(8)
    assert _events(lambda: x.sum().item()) == ["aten._local_scalar_dense"]
    assert _events(lambda: x[x > 0]) == ["aten.index"]
    assert _events(lambda: x.nonzero()) == ["aten.nonzero"]
    assert _events(lambda: torch.bincount(x.long().abs())) == ["aten.bincount"]
    assert _events(lambda: x.tolist()) == ["Tensor.tolist"]
    assert _events(lambda: x.cpu()) == ["Tensor.cpu"]
    assert _events(lambda: torch.tensor(1.0, device=x.device)) == ["torch.tensor(data, device=...)"]
    assert _events(lambda: x.repeat_interleave(x.long().abs())) == ["aten.repeat_interleave"]

    def host_only():  # a flag made on the host (no device=), and what is computed from it, reads for free
        flag = torch.zeros(1)
        (flag + 1).item()
        torch.tensor([2.0]).tolist()
        (x * 2).sum()  # device work without a read
    assert _events(host_only) == []


def test_watch_raises_one_line_naming_the_op_and_the_caller():
    x = torch.randn(4)
    with pytest.raises(LinguaError, match=r"host sync in step 3 .*aten._local_scalar_dense at tests/test_host_sync"):
        with watch(HostSyncDetector(cpu_as_device=True), 3):
            float(x.sum())
    with watch(HostSyncDetector(cpu_as_device=True), 3, enabled=False):  # a logging step may read
        float(x.sum())


@pytest.mark.parametrize("model", list(MODELS))
def test_no_host_sync_between_logging_steps(model, tiny_corpus, tmp_path):
    """6 steps, logging and saving at step 3 and 6: steps 1, 2, 4, 5 must not wait for the device."""
    kv = {**TRAIN, **MODELS[model][1], "dump_dir": tmp_path, "data.root_dir": tiny_corpus, "steps": 6,
          "logging.freq": 3, "checkpoint.dump.every": 3, "logging.check_host_syncs": True}
    spec = _spec(model)
    result = train(load_config(train_args_cls(spec), [f"{k}={v}" for k, v in kv.items()]), spec)
    assert result["status"] == "done" and result["step"] == 6 and 0 < result["loss"] < 20  # mtp: a sum of 3 heads
