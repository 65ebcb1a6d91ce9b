"""What CPU a figure was measured on: its model name, usable cores and ATen's kernel family.

Benchmarks print this so a record says which kind of CPU it is from (an AMD and an Intel machine
both report x86_64, and their ratios differ)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model from /proc/cpuinfo (else platform's answer)."""
    try:
        with cpuinfo.open() as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe_cpu() -> str:
    """'<model>, N cores usable, ATen <ISA>': the line a CPU benchmark's header carries."""
    return f"{cpu_name()}, {usable_cores()} cores usable, ATen {torch.backends.cpu.get_cpu_capability()}"


def describe_device(device: str | torch.device = "cpu") -> str:
    """The GPU's name on CUDA, else describe_cpu()."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
