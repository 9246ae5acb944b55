"""Find the operations that make the host wait for the device (a "host sync"), on CPU as on GPU.

    with HostSyncDetector(cpu_as_device=True) as d:
        train_step()
    d.events  # [("aten.nonzero", "apps/moe/model.py:123"), ...]

On a GPU a step that never waits for the device keeps the GPU fed; one `.item()` per step stalls the pipeline. CUDA
has `torch.cuda.set_sync_debug_mode`, but CI has no GPU, so this detector decides from the operations themselves:

- values read on the host: `aten._local_scalar_dense` (`.item()`, `float(t)`, `if t:`), `.tolist()`, `.cpu()`,
  `.numpy()` of a device tensor;
- operations whose output shape depends on device values: `nonzero`, `masked_select`, `unique`, `bincount` (CUDA
  computes the max first), indexing with a boolean mask, `repeat_interleave` without `output_size`;
- Python data copied to the device: `torch.tensor(data, device=...)` / `torch.as_tensor(..., device=...)`.

Which tensors live "on the device"? On a GPU, those not on the CPU. With `cpu_as_device` (a CPU run standing in for a
GPU run) every tensor is a device tensor except those the code made on purpose on the host: created by a factory
without `device=` (a gloo flag, AdamW's step counter) and whatever is computed from such tensors only. `.to(...)` is
never counted: on CPU a host-to-device move cannot be told from a no-op.
"""

import contextlib
import os
import sys
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from lingua.errors import LinguaError

# aten operations that wait for the device whatever their arguments (beyond being on the device)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique", "_unique2",
                      "unique_consecutive", "unique_dim"})
# Tensor methods that copy a device tensor to the host
HOST_READS = frozenset({"tolist", "cpu", "numpy"})
# factories whose result is a host tensor when they are given no device
FACTORIES = frozenset({"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "scalar_tensor"})
_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _caller() -> str:
    """file:line of the innermost frame outside torch and this file: the code that asked for the sync."""
    frame = sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_TORCH) and os.path.dirname(name) != _HERE and "/contextlib.py" not in name:
            return f"{os.path.relpath(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _bool_index(func, args) -> bool:
    """aten.index / index_put with a boolean mask among the indices (a nonzero inside)."""
    name = func._overloadpacket.__name__
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, detector: "HostSyncDetector"):
        super().__init__()
        self.d = detector

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if self.d.is_device(t)]
        needs_size = (name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor")
                      and kwargs.get("output_size") is None)
        if on_device and (name in SYNC_OPS or _bool_index(func, args) or needs_size):
            self.d.record(f"aten.{name}")
        out = func(*args, **kwargs)
        if tensors and not on_device:  # computed from host tensors only: a host tensor too
            self.d.mark_host(out)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, detector: "HostSyncDetector"):
        super().__init__()
        self.d = detector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor) and self.d.is_device(args[0]):
            self.d.record(f"Tensor.{name}")
        device = kwargs.get("device")
        copies_data = name in ("tensor", "as_tensor") and args and not isinstance(args[0], torch.Tensor)
        if copies_data and device is not None and self.d.device_arg(device):
            self.d.record(f"torch.{name}(data, device=...)")
        out = func(*args, **kwargs)
        if name in FACTORIES and device is None and func.__module__ in ("torch", None):
            self.d.mark_host(out)
        return out


class HostSyncDetector:
    """A context manager recording every host sync (op name, caller) in `events`; see the module docstring."""

    def __init__(self, cpu_as_device: bool = False):
        self.cpu_as_device = cpu_as_device
        self.events: list[tuple[str, str]] = []
        self._host = WeakTensorKeyDictionary()
        self._modes: list = []

    def is_device(self, t: torch.Tensor) -> bool:
        if t.device.type == "meta":
            return False
        if t.device.type != "cpu":
            return True
        return self.cpu_as_device and t not in self._host

    def device_arg(self, device) -> bool:
        return torch.device(device).type != "cpu" or self.cpu_as_device

    def mark_host(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._host[t] = True

    def record(self, what: str) -> None:
        self.events.append((what, _caller()))

    def __enter__(self):
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []


def describe(events: list[tuple[str, str]], limit: int = 3) -> Optional[str]:
    """The first few distinct events as one line, or None when there were none."""
    seen = list(dict.fromkeys(f"{what} at {where}" for what, where in events))
    if not seen:
        return None
    more = f" (+{len(seen) - limit} more)" if len(seen) > limit else ""
    return "; ".join(seen[:limit]) + more


@contextlib.contextmanager
def watch(detector: Optional[HostSyncDetector], step: int, enabled: bool = True):
    """Run a train step under `detector` (logging.check_host_syncs); any host sync in it is one LinguaError."""
    if detector is None or not enabled:
        yield
        return
    detector.events.clear()
    with detector:
        yield
    found = describe([e for e in detector.events if not allowed(e)])
    if found:
        raise LinguaError(f"host sync in step {step} (not a logging or save step): {found}")


# Syncs a step may keep, as (op, caller file) and why.
ALLOWED = (
    # the loop over experts (model.grouped_mm=false) needs the split sizes on the host; torch._grouped_mm does not
    ("Tensor.tolist", "apps/moe/model.py"),
    # expert parallelism exchanges tokens all-to-all: the split sizes must be on the host (apps/moe/dispatch.py),
    # so its bincount costs nothing more
    ("Tensor.tolist", "apps/moe/dispatch.py"),
    ("aten.bincount", "apps/moe/dispatch.py"),
)


def allowed(event: tuple[str, str]) -> bool:
    what, where = event
    return any(what == op and where.startswith(path + ":") for op, path in ALLOWED)
