"""`megamoe doctor` under torchrun (2 ranks, gloo): all-reduce and all-to-all probes, per-rank checks, exit status."""

from __future__ import annotations

import os

import pytest

from tests.distributed.helpers import REPO, torchrun

ARGS = ("-m", "megamoe", "doctor", "--shape", "3,8,16,24", "--seconds", "0.1")
ENV = {"TRITON_INTERPRET": "1"}

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels run in the interpreter")


def test_doctor_probes_the_world():
    res = torchrun(2, *ARGS, env=ENV, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert out.count("megamoe doctor") == 1  # rank 0 prints
    assert "same on all ranks  2 ranks (gloo)" in out
    for rank in (0, 1):
        assert f"ok    rank {rank} " in out and out.count(f"rank {rank} ") == 5  # device, 3 kernel lines, matmul
    assert "ok    all-reduce         4 MiB fp32: " in out and "sums exact" in out
    assert "ok    all-to-all         4 MiB fp32: " in out and "chunks exact" in out
    assert out.rstrip().endswith("checks passed")


def test_doctor_fails_everywhere_when_one_rank_fails():
    """Rank 1's kernels cannot compile (planted): the report names rank 1, and torchrun sees a failure."""
    planted = str(REPO / "tests" / "distributed" / "planted")
    res = torchrun(2, *ARGS, env={**ENV, "PYTHONPATH": planted}, timeout=180)
    assert res.returncode != 0
    assert "FAILED: kernels rank 1" in res.stdout and "kernels rank 0" not in res.stdout.split("FAILED")[-1]
    assert "arange's range must be a power of 2" in res.stdout
