"""megamoe.utils.host: the CPU line benchmark headers and `megamoe doctor` print."""

from __future__ import annotations

import platform

import torch

from megamoe.utils import host

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: avx2\n"
INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"


def test_cpu_name_reads_the_model_line(tmp_path):
    """The two kinds of CPU this project measures on are told apart by the model line."""
    for text, name in ((AMD, "AMD EPYC 7B13"), (INTEL, "Intel(R) Xeon(R) Processor")):
        (tmp_path / "cpuinfo").write_text(text)
        assert host.cpu_name(tmp_path / "cpuinfo") == name


def test_cpu_name_without_cpuinfo_falls_back(tmp_path):
    """No /proc/cpuinfo (not Linux) or no model line: platform's answer, never an exception."""
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n")
    expected = platform.processor() or platform.machine() or "unknown CPU"
    assert host.cpu_name(tmp_path / "missing") == host.cpu_name(tmp_path / "cpuinfo") == expected


def test_describe_cpu_names_cores_and_kernel_family():
    """The header line carries the model, the usable cores and ATen's ISA (AVX2 on AMD, AVX512 on Intel here)."""
    line = host.describe_cpu()
    assert line.startswith(host.cpu_name())
    assert f"{host.usable_cores()} cores usable" in line
    assert line.endswith(f"ATen {torch.backends.cpu.get_cpu_capability()}")
    assert host.describe_device("cpu") == line


def test_native_bf16_reads_the_flags_line(tmp_path):
    """AMX and AVX512-BF16 count; an AVX2-only CPU has none; no flags line or no file is unknown (None)."""
    cases = {
        AMD: [],
        INTEL + "flags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n": ["amx_bf16", "avx512_bf16"],
        INTEL + "flags\t\t: avx2 avx512f avx512_bf16\n": ["avx512_bf16"],
        INTEL: None,
    }
    for text, expected in cases.items():
        (tmp_path / "cpuinfo").write_text(text)
        assert host.native_bf16(tmp_path / "cpuinfo") == expected
    assert host.native_bf16(tmp_path / "missing") is None
