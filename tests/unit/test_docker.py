"""The Dockerfile (no Docker engine here): a pinned NGC base, sources that exist, pinned installs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.\-]+", line) for line in lines), "every line name==version"
    return {line.split("==")[0].lower(): line.split("==")[1] for line in lines}


def test_base_image_is_a_pinned_ngc_pytorch():
    froms = [args for ins, args in instructions() if ins == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", froms[0])


def test_copied_paths_exist_and_installs_are_pinned():
    for ins, args in instructions():
        if ins == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
        if ins == "RUN" and "pip install" in args:
            assert "-c constraints/gpu.txt" in args
            assert not re.search(r"pip install[^&]*\btorch\b", args), "the image's torch must be kept"
    gpu, cpu = pins(ROOT / "constraints" / "gpu.txt"), pins(ROOT / "constraints" / "cpu.txt")
    assert "faiss-gpu-cu12" in gpu and "torch" not in gpu and "triton" not in gpu
    for name, version in gpu.items():
        assert cpu.get(name, version) == version, f"{name}: gpu pin {version} != cpu pin {cpu.get(name)}"


def test_kernels_are_validated_at_build_time_and_ignores():
    runs = [args for ins, args in instructions() if ins == "RUN"]
    assert any("TRITON_INTERPRET=1" in r and "tests/kernels" in r for r in runs)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".cache", ".git"} <= set(ignored)
