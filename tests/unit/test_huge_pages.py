"""megamoe processes put torch's big CPU tensors on transparent huge pages: a 64 MiB tensor faults few pages in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MODE = THP.read_text().split("[")[1].split("]")[0] if THP.is_file() else "never"
PAGES = 2**26 // 4096
"""4 KiB pages of a 64 MiB tensor: the faults of a fresh allocation without huge pages."""

PROBE = """
import resource, sys
if sys.argv[1] == "megamoe":
    from megamoe.cli.main import main
    assert main(["config", "--keys"]) == 0  # any command: the entry point sets the default
import torch
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(2**24)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())  # glibc maps 64 MiB afresh every time: these faults recur every step
"""


def second_allocation_faults(how: str) -> int:
    """Minor faults of allocating and filling a 64 MiB tensor for the second time, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | {"PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", PROBE, how], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1])


@pytest.mark.skipif(MODE == "never", reason="transparent huge pages are off on this machine")
def test_megamoe_processes_fault_few_pages_for_big_tensors():
    """Through the entry point: well under an eighth of the 4 KiB pages (measured: ~550 of 16,384)."""
    assert second_allocation_faults("megamoe") < PAGES // 8


@pytest.mark.skipif(MODE != "madvise", reason="only in madvise mode does a plain process fault every 4 KiB page")
def test_without_the_entry_point_every_page_faults():
    """The control: a plain torch process in madvise mode faults each 4 KiB page (the test above can fail)."""
    assert second_allocation_faults("plain") > PAGES // 2
