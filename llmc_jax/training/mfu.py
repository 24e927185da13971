"""Model FLOPs utilization as llm.c reports it, and the device peak table it needs."""
from __future__ import annotations

# Dense bf16 tensor-core peaks in FLOP/s, by jax's device_kind. llm.c's table (mfu.h) scales by
# SKU core count and clock; these are the resulting figures for the cards we can name.
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.5e12,      # H100 SXM
    "NVIDIA H100 PCIe": 756.0e12,
    "NVIDIA H100 NVL": 835.0e12,
    "NVIDIA H200": 989.5e12,
    "NVIDIA GH200 480GB": 989.5e12,
    "NVIDIA A100-SXM4-80GB": 312.0e12,
    "NVIDIA A100-SXM4-40GB": 312.0e12,
    "NVIDIA A100 80GB PCIe": 312.0e12,
    "NVIDIA A100-PCIE-40GB": 312.0e12,
}


def device_peak_flops(device_kind: str) -> float | None:
    """The bf16 peak of a device, or None where it is unknown (CPUs, unlisted GPUs)."""
    return PEAK_BF16_FLOPS.get(device_kind)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, device_kind: str) -> float | None:
    """Fraction of the devices' peak achieved; None where no peak is known."""
    peak = device_peak_flops(device_kind)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * num_devices)


# HBM bandwidth in bytes/s by device_kind: the ceiling of memory-bound kernels (layernorm).
PEAK_HBM_BYTES: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA GH200 480GB": 4.0e12,
    "NVIDIA A100-SXM4-80GB": 2.04e12,
    "NVIDIA A100-SXM4-40GB": 1.56e12,
    "NVIDIA A100 80GB PCIe": 1.94e12,
    "NVIDIA A100-PCIE-40GB": 1.56e12,
}


def device_peak_bandwidth(device_kind: str) -> float | None:
    """The HBM bandwidth of a device in bytes/s, or None where it is unknown."""
    return PEAK_HBM_BYTES.get(device_kind)
