"""The accelerators megatron-lite knows: memory, peak FLOP/s, link bandwidths.

One table for the planner (``python -m megatron_lite.plan --device NAME``) and for the
MFU the trainer logs (matched by the CUDA device name). Peaks are dense (no sparsity)
tensor-core figures from NVIDIA's datasheets; bf16 means the 16-bit tensor-core peak
(fp16 on the V100, which has no bf16). Links are per direction.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class Device(NamedTuple):
    memory: int | None  # bytes (None: this host's memory)
    bf16: float  # peak FLOP/s, 16-bit
    fp32: float  # peak FLOP/s, fp32 (no TF32)
    tp_link: float  # bytes/s between the GPUs of a node
    dp_link: float  # bytes/s between nodes, per GPU
    cuda_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name


DEVICES = {
    # H100 SXM5 80GB: 989 TFLOP/s dense bf16, 67 fp32 (NVIDIA H100 datasheet); NVLink 4
    # 900 GB/s total, 450 per direction; one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s)
    # memory: the totals nvidia-smi reports (H100 SXM 81559 MiB, A100 80GB 81920 MiB,
    # H200 143771 MiB), not measured here
    "h100": Device(81559 * 2**20, 989e12, 67e12, 450e9, 50e9, ("H100",)),
    # A100 SXM4 80GB: 312 TFLOP/s dense bf16, 19.5 fp32 (NVIDIA A100 datasheet); NVLink 3
    # 600 GB/s total, 300 per direction; 200 Gb/s HDR InfiniBand per GPU (25 GB/s)
    "a100-80g": Device(81920 * 2**20, 312e12, 19.5e12, 300e9, 25e9, ("A100",)),
    # H200 SXM 141GB: the H100's compute and links with 141 GB HBM3e (NVIDIA H200 datasheet)
    "h200": Device(143771 * 2**20, 989e12, 67e12, 450e9, 50e9, ("H200",)),
    # PCIe cards (datasheets; memory as the datasheet's GB, links PCIe 4.0 x16 ~32 GB/s
    # per direction, 100 Gb/s Ethernet/IB between nodes assumed): A10 24 GB 125 / 31.2
    # TFLOP/s; L40 48 GB 181 / 90.5
    "a10": Device(24 * 10**9, 125e12, 31.2e12, 32e9, 12.5e9, ("A10",)),
    "l40": Device(48 * 10**9, 181e12, 90.5e12, 32e9, 12.5e9, ("L40",)),
    # V100 SXM2 32 GB: 125 TFLOP/s fp16 tensor cores, 15.7 fp32; NVLink 2 150 GB/s per
    # direction; 100 Gb/s EDR InfiniBand per GPU (12.5 GB/s)
    "v100": Device(32 * 2**30, 125e12, 15.7e12, 150e9, 12.5e9, ("V100",)),
    # this 2-core CPU: matmul peaks measured by bench/train_step.py (fp32 ~177 GFLOP/s,
    # bf16 ~405); memory is the host's; gloo over loopback, ~5 GB/s assumed
    "cpu": Device(None, 405e9, 177e9, 5e9, 5e9),
}


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_for_cuda_name(name: str) -> Device | None:
    """The entry whose CUDA name occurs in ``name`` (longest first: "A100" before "A10")."""
    matches = [(len(n), d) for d in DEVICES.values() for n in d.cuda_names if n in name]
    return max(matches, key=lambda m: m[0])[1] if matches else None
