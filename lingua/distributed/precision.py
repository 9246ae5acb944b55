"""Which dtype the model computes in, and the autocast context for it.

`distributed.model_dtype: auto` picks bf16 only where the hardware runs bf16 matmuls natively: CUDA GPUs with
bf16 (compute capability >= 8.0, or ROCm) and CPUs with AMX or AVX512-BF16. Elsewhere bf16 is emulated: on an
AVX2-only CPU a bf16 matmul runs about 30x slower than fp32, so auto picks fp32 there.
"""

import contextlib
import platform

import torch

from lingua.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # every dtype name lingua takes
MODEL_DTYPES = ("auto", "bf16", "fp32")  # what distributed.model_dtype trains in


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for benchmark output: which CPU ran it."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_features() -> list[str]:
    """The native-bf16 CPU features torch reports on this machine: a sublist of ['AMX-BF16', 'AVX512-BF16']."""
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9: one dict of cpuinfo flags
    if caps is not None:
        c = caps()
        amx, avx512_bf16 = c.get("amx_bf16", c.get("amx_tile", False)), c.get("avx512_bf16", False)
    else:
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    # without oneDNN torch has no kernels that use those instructions
    if not torch.backends.mkldnn.is_available():
        return []
    return [name for name, ok in (("AMX-BF16", amx), ("AVX512-BF16", avx512_bf16)) if ok]


def _cuda_native_bf16(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and later; older GPUs only emulate bf16


def resolve_model_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """`distributed.model_dtype` (auto | bf16 | fp32) -> (dtype, a one-line reason a person can read)."""
    req = str(requested).lower()
    if req not in MODEL_DTYPES:
        raise ConfigError(f"distributed.model_dtype: expected auto, bf16 or fp32, got '{requested}'")
    device = torch.device(device)

    if device.type == "cuda":
        native = _cuda_native_bf16(device)
        if not torch.cuda.is_available():
            why_native = "CUDA is not available"
        else:
            name = torch.cuda.get_device_name(device)
            why_native = f"{name} has native bf16" if native else f"{name} has no native bf16 (emulated, slow)"
    elif device.type == "cpu":
        feats = cpu_bf16_features()
        native = bool(feats)
        why_native = (
            f"CPU has {' and '.join(feats)}"
            if native
            else f"CPU has {torch.backends.cpu.get_cpu_capability()} only; bf16 matmuls are emulated and slow"
        )
    else:
        native, why_native = False, f"no bf16 autocast path for device type '{device.type}' here"

    if req == "auto":
        dtype = torch.bfloat16 if native else torch.float32
        return dtype, f"{'bf16' if native else 'fp32'} (auto): {why_native}"
    return DTYPES[req], f"{req}: set by distributed.model_dtype ({why_native})"


def inference_dtype(requested, device) -> torch.dtype:
    """Generation's weights: 'auto' (or None) is bf16 on a CUDA GPU with native bf16 (decoding reads every weight
    per token: half the bytes), fp32 elsewhere (CPU decoding keeps its fp32 numerics); else parse_dtype."""
    if requested in (None, "auto"):
        device = torch.device(device)
        return torch.bfloat16 if device.type == "cuda" and _cuda_native_bf16(device) else torch.float32
    return parse_dtype(requested)


def parse_dtype(name, what: str = "dtype") -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or a torch.dtype) -> the torch.dtype, or a one-line ConfigError naming `what`."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"{what} must be one of {', '.join(DTYPES)} (got {name!r})")
    return DTYPES[name]


def autocast_context(device: torch.device, dtype: torch.dtype):
    """torch.autocast to bf16 on cpu/cuda; a no-op context for fp32 (params and optimizer state stay fp32)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"distributed.model_dtype: {dtype} autocast is not supported on device '{device.type}'")
    return torch.autocast(device_type=device.type, dtype=dtype)
