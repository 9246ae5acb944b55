"""The accelerators a plan can target: dense peak FLOP/s (no sparsity), memory, and the two links collectives use.

Bandwidths are per GPU and per direction (what a ring collective's each step moves): NVLink / Infinity Fabric inside a
node, the GPU's share of the node's network (one 400 Gb/s NIC per GPU = 50 GB/s) across nodes. Peaks and bandwidths
are the vendors' datasheet numbers; `lingua.train.metrics.GPU_PEAK_FLOPS` holds the MFU table of a running job.
"""

from dataclasses import dataclass

from lingua.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s
    fp8_flops: float | None  # dense fp8 peak; None: no fp8 tensor cores
    hbm_gib: float  # memory per GPU a job can use, GiB (the datasheet's GB, converted)
    hbm_bw: float  # bytes/s (the optimizer step is bound by it)
    intra_bw: float  # bytes/s per direction per GPU inside a node (NVLink, Infinity Fabric)
    inter_bw: float  # bytes/s per direction per GPU across nodes
    per_node: int  # GPUs per node: a group larger than this crosses nodes
    source: str


GB = 1e9
SOURCES = {
    "h100": "NVIDIA H100 Tensor Core GPU datasheet (SXM): 989 TF bf16, 1979 TF fp8 dense, 80 GB HBM3 3.35 TB/s, "
            "NVLink 900 GB/s bidirectional; DGX H100: 8x ConnectX-7 400 Gb/s",
    "h200": "NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TF bf16, 1979 TF fp8 dense, 141 GB HBM3e 4.8 TB/s, "
            "NVLink 900 GB/s bidirectional; HGX H200: 8x 400 Gb/s",
    "a100": "NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): 312 TF bf16 dense, 80 GB HBM2e 2.04 TB/s, "
            "NVLink 600 GB/s bidirectional; DGX A100: 8x HDR 200 Gb/s",
    "b200": "NVIDIA DGX B200 datasheet: 72 PF fp8 / 8 GPUs sparse = 4.5 PF dense, 2.25 PF bf16 dense, "
            "1,440 GB HBM3e / 8, NVLink 5 1.8 TB/s bidirectional; 8x ConnectX-7 400 Gb/s",
    "mi300x": "AMD Instinct MI300X datasheet: 1307.4 TF bf16, 2614.9 TF fp8 dense, 192 GB HBM3 5.3 TB/s, "
              "Infinity Fabric 7 links x 128 GB/s (896 GB/s bidirectional); 8x 400 Gb/s NICs",
}
GPUS = {  # name, bf16, fp8, HBM GiB, HBM bytes/s, NVLink, inter-node, GPUs per node, source
    "h100": GPU("H100 SXM 80GB", 989e12, 1979e12, 80e9 / 2**30, 3.35e12, 450 * GB, 50 * GB, 8, SOURCES["h100"]),
    "h200": GPU("H200 SXM 141GB", 989e12, 1979e12, 141e9 / 2**30, 4.8e12, 450 * GB, 50 * GB, 8, SOURCES["h200"]),
    "a100": GPU("A100 SXM 80GB", 312e12, None, 80e9 / 2**30, 2.04e12, 300 * GB, 25 * GB, 8, SOURCES["a100"]),
    "b200": GPU("B200 180GB", 2250e12, 4500e12, 180e9 / 2**30, 8e12, 900 * GB, 50 * GB, 8, SOURCES["b200"]),
    "mi300x": GPU("MI300X 192GB", 1307.4e12, 2614.9e12, 192e9 / 2**30, 5.3e12, 448 * GB, 50 * GB, 8, SOURCES["mi300x"]),
}


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"gpu={name!r} is not one of {', '.join(GPUS)}") from None
