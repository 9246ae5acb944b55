"""Which attention kernel runs: the kernel lingua selects for each attention call (lingua/kernels/attention/select.py,
the function the train loop places the model with) and, where that is SDPA, the backend torch picks and why faster
ones were rejected. `device=cuda` on a machine without a GPU prints what lingua would run there.

lingua's SDPA kernel calls F.scaled_dot_product_attention, which dispatches to FlashAttention-2, memory-efficient
(cutlass), cuDNN or the unfused math kernel on CUDA, and to a fused flash-style kernel or math on CPU, depending on
device, dtype, head dim, mask and GQA. Rather than restating torch's rules, this asks torch: `torch._fused_sdp_choice`
(the dispatcher SDPA itself runs) on the exact tensors lingua would pass (`lingua.kernels.attention.sdpa.sdpa_inputs`),
and torch's own predicates in debug mode for the reasons a faster backend was turned down.

    python -m lingua.attention_report config=apps/main/configs/debug.yaml [model.dim=...] [device=cpu] [dtype=bf16]
"""

import difflib
import sys
import warnings
from dataclasses import fields

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lingua.distributed.precision import DTYPES, cpu_name
from lingua.errors import ConfigError, LinguaError, print_error
from lingua.kernels.attention.measure import AttentionShape
from lingua.kernels.attention.sdpa import sdpa_inputs
from lingua.kernels.attention.select import (
    KERNELS,
    OWN_BACKWARD,
    Placement,
    resolve_backward,
    select_kernel,
)
from lingua.models.transformer.model import TransformerArgs

SDPA_BACKENDS = {  # (device type, backend) -> (what it is, the aten op a profiler trace shows)
    ("cpu", SDPBackend.FLASH_ATTENTION): ("fused flash CPU kernel", "_scaled_dot_product_flash_attention_for_cpu"),
    ("cpu", SDPBackend.MATH): ("math (unfused, materialises scores)", "_scaled_dot_product_attention_math"),
    ("cuda", SDPBackend.FLASH_ATTENTION): ("FlashAttention-2", "_scaled_dot_product_flash_attention"),
    ("cuda", SDPBackend.EFFICIENT_ATTENTION): ("memory-efficient (cutlass)", "_scaled_dot_product_efficient_attention"),
    ("cuda", SDPBackend.CUDNN_ATTENTION): ("cuDNN attention", "_scaled_dot_product_cudnn_attention"),
    ("cuda", SDPBackend.MATH): ("math (unfused, materialises scores)", "_scaled_dot_product_attention_math"),
}
CUDA_PREDICATES = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.can_use_flash_attention,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.can_use_efficient_attention,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.can_use_cudnn_attention,
}


def _reasons(caught, error: str = "") -> str:
    """torch's debug warnings (and the lines of its error, where newer torch lists them), without source locations."""
    msgs = [str(w.message).split(" (Triggered internally at")[0].strip() for w in caught] + error.splitlines()[1:]
    msgs = [m for m in msgs if m and not m.endswith(("not used because:", "Rejected backends:"))]
    return "; ".join(msgs) or "torch gave no reason (it prints some only once per process)"


def _why_not(backend: SDPBackend, q, k, v, attn_mask, is_causal) -> str:
    """torch's own reason `backend` cannot run these inputs ('' when it could)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if q.device.type == "cuda":
            params = torch.backends.cuda.SDPAParams(q, k, v, attn_mask, 0.0, is_causal, False)
            return "" if CUDA_PREDICATES[backend](params, debug=True) else _reasons(caught)
        # CPU has no public predicate; with only flash allowed, the dispatcher prints why it refuses, then raises
        if not torch.backends.cuda.flash_sdp_enabled():
            return "disabled at runtime (torch.backends.cuda.enable_flash_sdp(False) or an sdpa_kernel context)"
        with sdpa_kernel([backend]):
            try:
                torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal)
                return ""
            except RuntimeError as e:
                return _reasons(caught, str(e))


def _candidates(device_type: str) -> list[SDPBackend]:
    if device_type == "cuda":  # the order the CUDA dispatcher tries, as torch reports it
        return [SDPBackend(i) for i in torch._C._get_sdp_priority_order() if i != SDPBackend.OVERRIDEABLE.value]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]  # fixed order in aten's sdp_utils_cpp.cpp


def _row(phase, mask_name, dtype, q, k, v, attn_mask, is_causal) -> dict:
    device_type = q.device.type
    row = dict(phase=phase, dtype=str(dtype).removeprefix("torch."), mask=mask_name, device=device_type,
               q_shape=tuple(q.shape), kv_shape=tuple(k.shape), is_causal=is_causal, rejected=[])
    try:
        backend = SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal))
    except RuntimeError as e:  # every backend disabled or unusable: SDPA itself would raise this
        row.update(backend="ERROR", kernel=str(e).splitlines()[0], op="")
        backend = SDPBackend.ERROR
    else:
        kernel, op = SDPA_BACKENDS.get((device_type, backend), (backend.name.lower(), ""))
        row.update(backend=backend.name, kernel=kernel, op=f"aten::{op}" if op else "")
    if device_type in ("cpu", "cuda"):
        for faster in _candidates(device_type):
            if faster == backend:
                break
            if faster != SDPBackend.MATH:
                why = _why_not(faster, q, k, v, attn_mask, is_causal)
                row["rejected"].append((faster.name, why or "usable, but the dispatcher preferred another"))
    return row


def _lingua_row(phase, mask_name, dtype, device_type, kernel, q_shape, kv_shape, note="") -> dict:
    """A row for a call torch's SDPA dispatcher does not decide (flex, xformers) or cannot be asked here (no GPU)."""
    about = KERNELS[kernel].about + (f"; {note}" if note else "")
    return dict(phase=phase, dtype=str(dtype).removeprefix("torch."), mask=mask_name, device=device_type,
                q_shape=q_shape, kv_shape=kv_shape, is_causal=True, lingua=kernel, backend=kernel, kernel=about,
                op="", rejected=[])


def _train_row(args, device, dtype, kernel, qkv, train_mask) -> dict:
    """The training call through `kernel` (a KERNELS name), as lingua makes it."""
    q, k, v, attn_mask, is_causal = sdpa_inputs(*qkv, train_mask)
    if kernel == "sdpa" and _can_ask(device):
        return _row("train", args.mask, dtype, q, k, v, attn_mask, is_causal) | {"lingua": kernel}
    if kernel == "cpu_matmul_backward":  # calls aten's CPU flash forward itself, whatever SDPA would pick
        op = "aten::_scaled_dot_product_flash_attention_for_cpu"
        return _lingua_row("train", args.mask, dtype, "cpu", kernel, tuple(q.shape), tuple(k.shape)) | dict(
            backend=SDPBackend.FLASH_ATTENTION.name, kernel=KERNELS[kernel].about, op=op)
    note = {"flex": "no backward on CPU: training raises", "xformers": "needs CUDA: raises on this device"}
    note = note.get(kernel, "") if device.type == "cpu" else NO_GPU if kernel == "sdpa" else ""  # sdpa: no GPU here
    return _lingua_row("train", args.mask, dtype, device.type, kernel, tuple(q.shape), tuple(k.shape), note)


def _can_ask(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


NO_GPU = "torch's SDPA dispatcher picks flash/cuDNN/efficient/math on the GPU: run this report there to see which"


def report_attention(args: TransformerArgs, device="cpu", dtype=torch.float32, seq_len=None) -> list[dict]:
    """One row per attention call lingua makes: the kernel lingua selects (lingua/kernels/attention/select.py, as
    `place_attention` does for a run on `device` in `dtype`), and where it is SDPA, the backend torch selects and why
    faster ones were rejected; the train row's "backward" says which backward compiled training runs.

    train: q = kv = seq_len (default max_seqlen), args.mask, inputs requiring grad (evaluation runs its forward).
    prefill: one prompt through the KV cache, causal, no grad. decode: 1 query against a KV cache of seq_len entries
    sliced to its filled length (no mask). The KV cache always calls SDPA."""
    n_heads, n_kv_heads, head_dim = args.heads
    device = torch.device(device)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    seq_len = seq_len or args.max_seqlen
    shape = AttentionShape(1, seq_len, n_heads, n_kv_heads, head_dim, args.mask)
    placement = Placement(device.type, dtype, compiled=True, machine=cpu_name())
    backward, why = resolve_backward(args.attn_backward, args.attn_impl, args.mask, placement, shape, run=False)
    kernel = select_kernel(args.attn_impl, args.mask, device.type, "matmul" if backward == "matmul" else "aten")
    on = device if _can_ask(device) else torch.device("meta")  # the shapes still tell the story without a GPU

    def qkv(q_len, kv_len, grad):
        new = lambda n, s: torch.zeros(1, s, n, head_dim, device=on, dtype=dtype, requires_grad=grad)
        return new(n_heads, q_len), new(n_kv_heads, kv_len), new(n_kv_heads, kv_len)  # (bs, seqlen, heads, head_dim)

    # two packed documents: only the mask's shape, dtype and strides matter to the dispatcher, not its content
    tok_idx = (torch.arange(seq_len, device=on) % max(1, (seq_len + 1) // 2))[None]
    train_mask = KERNELS["sdpa"]().mask(tok_idx if args.mask == "block_causal" else None, 1, seq_len, on)
    rows = [_train_row(args, device, dtype, kernel, qkv(seq_len, seq_len, True), train_mask)]
    if why != OWN_BACKWARD:
        rows[0]["backward"] = f"under torch.compile: {why}" if args.attn_backward == "auto" else why
    for phase, mask_name, (q, k, v, _, _) in (("prefill", "causal", sdpa_inputs(*qkv(seq_len, seq_len, False), None)),
                                              ("decode", "none", sdpa_inputs(*qkv(1, seq_len, False), None))):
        if not _can_ask(device):
            rows.append(_lingua_row(phase, mask_name, dtype, device.type, "sdpa", tuple(q.shape), tuple(k.shape),
                                    NO_GPU))
            continue
        # decode: is_causal would align the 1 query to key 0
        rows.append(_row(phase, mask_name, dtype, q, k, v, None, phase == "prefill") | {"lingua": "sdpa"})
    return rows


def format_report(rows: list[dict]) -> str:
    """A small table: one line per call, then one indented line per faster backend that was rejected."""
    header = ("phase", "dtype", "mask", "q (b,h,s,d)", "kv len", "lingua kernel", "backend", "kernel", "aten op")
    table = [header]
    for r in rows:
        table.append((r["phase"], r["dtype"], r["mask"], str(r["q_shape"]).replace(" ", ""),
                      str(r["kv_shape"][2]) if r["kv_shape"] else "", r["lingua"], r["backend"], r["kernel"], r["op"]))
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = []
    for i, line in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        for name, why in rows[i - 1]["rejected"] if i else ():
            lines.append(f"    {name} rejected: {why}")
        if i and rows[i - 1].get("backward"):
            lines.append(f"    backward: {rows[i - 1]['backward']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def _parse(argv: list[str]):
    """config=file.yaml (its `model:` section if any), model keys (dim=64 or model.dim=64), device, dtype, seq_len."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    opts, dotlist, file_cfg = {}, [], OmegaConf.create()
    for item in argv:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"expected key=value, got '{item}'")
        if key == "config":
            try:
                file_cfg = OmegaConf.load(value)
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {value}") from None
            except Exception as e:
                raise ConfigError(f"cannot parse {value}: {str(e).splitlines()[0]}") from None
            file_cfg = file_cfg.get("model", file_cfg)
        elif key in ("device", "dtype", "seq_len"):
            opts[key] = value
        else:
            dotlist.append(f"{key.removeprefix('model.')}={value}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TransformerArgs), file_cfg, OmegaConf.from_dotlist(dotlist))
    except ConfigKeyError as e:
        close = difflib.get_close_matches(str(e.key), [f.name for f in fields(TransformerArgs)], n=1)
        hint = f" (did you mean 'model.{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown key 'model.{e.key}'{hint}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"model.{e.full_key}: {str(e.msg).splitlines()[0]}") from None
    if opts.get("dtype", "fp32") not in DTYPES:
        raise ConfigError(f"dtype={opts['dtype']!r} is not one of {', '.join(DTYPES)}")
    return OmegaConf.to_object(cfg), opts


def main(argv=None) -> int:
    try:
        args, opts = _parse(sys.argv[1:] if argv is None else argv)
        device = opts.get("device", "cuda" if torch.cuda.is_available() else "cpu")
        dtypes = [opts["dtype"]] if "dtype" in opts else ["fp32", "bf16"]
        seq_len = int(opts["seq_len"]) if "seq_len" in opts else None
        rows = [row for dt in dtypes for row in report_attention(args, device, dt, seq_len)]
        n_heads, n_kv_heads, head_dim = args.heads
        if not device.startswith("cuda"):
            where = torch.backends.cpu.get_cpu_capability()
        else:
            where = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no GPU here: what would run"
        print(f"lingua attention report: torch {torch.__version__}, {device} ({where}), attn_impl={args.attn_impl}, "
              f"n_heads={n_heads}, n_kv_heads={n_kv_heads} (kv repeated to n_heads), head_dim={head_dim}")
        print(format_report(rows))
        return 0
    except LinguaError as e:
        return print_error(e)


if __name__ == "__main__":
    sys.exit(main())
