"""Peak FLOP/s per JAX device, the denominator of MFU and HFU.

Keyed by the exact `jax.Device.device_kind`: a substring match would read "TPU v5" (v5p) as a
prefix of "TPU v5 lite" (v5e), or an H100 PCIe as an SXM part, and a wrong peak is worse than none.
"""

import functools
import time

import jax
import numpy as np

# Dense (not 2:4 sparse) bf16 matmul peak per JAX device, from the vendors' datasheets. A v4 or
# v5p chip's two TensorCores form one JAX device (megacore), so these are per chip.
PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p on a TPU VM
    "TPU v5p": 459e12,  # v5p under Pathways
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM (an H200 NVL, 835e12, may report this name too)
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA B200": 2.25e15,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The table's peak for exactly this device kind, or None for one it does not know."""
    return PEAK_BF16_FLOPS.get(device_kind.strip())


@functools.lru_cache(maxsize=1)
def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """What this host's JAX reaches on a float32 matmul (the peak quoted for CPU MFU)."""
    a = jax.device_put(np.ones((size, size), np.float32), jax.local_devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    started = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def peak_flops_per_device(device_kind: str, platform: str, override: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where the figure comes from). override: train.peak_flops, used
    when positive. An unknown accelerator gets None: no MFU beats a guessed one."""
    if override > 0:
        return override, "train.peak_flops"
    if (table := peak_flops(device_kind)) is not None:
        return table, device_kind
    if platform == "cpu":
        # Fake CPU devices (--xla_force_host_platform_device_count) share the host's cores.
        return measured_matmul_flops() / len(jax.local_devices()), "measured float32 matmul on this CPU"
    return None, f"unknown device kind {device_kind!r}; set train.peak_flops"
