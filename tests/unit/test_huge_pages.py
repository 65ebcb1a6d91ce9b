"""megamoe processes ask for transparent huge pages for torch's big CPU tensors (THP_MEM_ALLOC_ENABLE)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import re, sys
if sys.argv[1] == "megamoe":
    from megamoe.cli.main import main
    assert main(["config", "--keys"]) == 0  # any command: the entry point sets the default
import torch
t = torch.empty(2**24)  # 64 MiB: glibc maps it afresh, torch advises the mapping
t.fill_(1.0)
lines = open("/proc/self/smaps").read().splitlines()
for i, line in enumerate(lines):
    span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
    if span and int(span[1], 16) <= t.data_ptr() < int(span[2], 16):
        print("FLAGS", next(x for x in lines[i + 1:] if x.startswith("VmFlags:")))
"""


def tensor_vm_flags(how: str) -> list[str]:
    """The kernel's VmFlags of the mapping that holds a fresh 64 MiB tensor, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | {"PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", PROBE, how], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("FLAGS ")]
    return line.split()[2:]


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="kernel without THP")
def test_entry_point_advises_huge_pages_for_big_tensors():
    """Through `megamoe` the mapping is advised for huge pages ('hg'); a plain torch process's is not.

    The flag is the advice itself, whether the kernel then finds free huge pages or not; docs/benchmarks.md
    has the faults it saves (16,385 → ~550 per 64 MiB tensor on the project machine)."""
    assert "hg" in tensor_vm_flags("megamoe")
    assert "hg" not in tensor_vm_flags("plain")
