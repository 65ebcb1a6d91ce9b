"""Peak device throughput for MFU: a table for known GPUs, a short matmul measurement on CPU."""

from __future__ import annotations

import functools
import time

import torch

GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (vendor figures, no sparsity)."""


def peak_tflops(device: torch.device, configured: float) -> tuple[float, str]:
    """Peak TFLOP/s of one device and where the figure comes from."""
    if configured > 0:
        return configured, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"vendor bf16 peak of {name}"
        return 0.0, f"unknown GPU {name}: set logging.peak_tflops"
    return measure_matmul_tflops(), "fp32 matmul measured at start"


@functools.cache
def measure_matmul_tflops(size: int = 1024, rounds: int = 5, seconds: float = 0.1) -> float:
    """Best fp32 matmul TFLOP/s on the CPU over several short rounds (a peak, not an average); once per process."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start) / 1e12)
    return best
