"""`megamoe doctor` in one process on the CPU: every section, and a planted kernel defect fails it."""

from __future__ import annotations

import os

import pytest

from megamoe.cli.main import main
from megamoe.ops import lory, lory_check

ARGS = ["doctor", "--shape", "3,8,16,24", "--seconds", "0.2"]
"""A small shape class keeps the interpreter's self-check under a second."""

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels run in the interpreter")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Each run self-checks anew; the once-per-process resolution log is restored after it."""
    monkeypatch.setattr(lory_check, "_RESULTS", {})
    monkeypatch.setattr(lory, "_LOGGED", set())


def test_doctor_passes_and_reports_every_section(capsys):
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    for line in ("stack", "devices", "kernels", "matmul"):
        assert f"\n{line}\n" in out
    for name in ("torch", "CUDA", "NCCL", "Triton", "megatron-core", "DeepSpeed", "apex", "TransformerEngine", "faiss"):
        assert f" {name} " in out
    assert "faiss              1." in out and "CPU only" in out
    assert "ok    cpu                CPU cpu float32 (E=3 T=8 D=16 F=24 class): max error" in out
    assert "ok    cpu                Triton cpu float32 (E=3 T=8 D=16 F=24 class): max error" in out
    assert "ok    cpu                Triton cpu bfloat16 (E=3 T=8 D=16 F=24 class)" in out
    assert "float32 1024³:" in out and "TFLOP/s" in out
    assert "collectives" not in out  # one process: no world to probe
    assert out.rstrip().endswith("checks passed")


def test_doctor_fails_on_a_kernel_that_does_not_compile(capsys, monkeypatch):
    """A block shape Triton rejects: the kernels line says what broke, and the exit status is 1."""
    import megamoe_kernels.lory as kernels

    monkeypatch.setattr(kernels, "_block", lambda size, cap: 48)
    assert main(ARGS) == 1
    out = capsys.readouterr().out
    assert "fail  cpu                Triton cpu float32 (E=3 T=8 D=16 F=24 class): InterpreterError at compile" in out
    assert "arange's range must be a power of 2" in out
    assert "doctor: 2 of 15 checks FAILED: kernels cpu; kernels cpu" in out


def test_doctor_rejects_a_malformed_shape(capsys):
    with pytest.raises(SystemExit):
        main(["doctor", "--shape", "8,256,1024"])
    assert "expected E,T,D,F (four positive integers)" in capsys.readouterr().err
