"""What CPU a figure was measured on (model name, usable cores, ATen's kernel family), and whether it runs bf16.

Benchmarks print this so a record says which kind of CPU it is from (an AMD and an Intel machine
both report x86_64, and their ratios differ). A CPU without native bf16 emulates bf16 autocast at a
small fraction of the fp32 speed (docs/benchmarks.md), which the trainer warns about."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(key: str, cpuinfo: Path) -> str | None:
    """The value of the first `key : value` line of /proc/cpuinfo, or None (no such line, or no file)."""
    try:
        with cpuinfo.open() as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU model from /proc/cpuinfo (else platform's answer)."""
    name = _cpuinfo_field("model name", cpuinfo)
    return name if name is not None else platform.processor() or platform.machine() or "unknown CPU"


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of the instructions that run bf16 matmuls natively (Intel AMX, AVX512-BF16)."""


def cpu_flags(cpuinfo: Path = CPUINFO) -> list[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot tell."""
    flags = _cpuinfo_field("flags", cpuinfo)
    return None if flags is None else flags.split()


def native_bf16(cpuinfo: Path = CPUINFO) -> list[str] | None:
    """The native-bf16 flags this CPU has ([] for none), or None where /proc/cpuinfo cannot tell."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


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
