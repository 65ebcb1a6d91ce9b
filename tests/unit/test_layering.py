"""Imports point one way: kernels → ops → model → parallel → train → sweep, interop → cli (DESIGN.md §3)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEVEL = {
    "errors": 0, "utils": 1, "config": 2, "megamoe_kernels": 2,
    "ops": 3, "model": 4, "data": 4, "parallel": 5, "analysis": 6, "train": 6, "sweep": 7, "interop": 7, "cli": 8,
}  # fmt: skip
FORBIDDEN = {
    "megamoe_kernels": ("torch.nn", "megamoe"),
    "ops": ("megatron",),
    "model": ("torch.distributed", "megatron", "deepspeed"),
}


def _package_of(path: Path) -> str:
    """Layer name of a source file."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "megamoe_kernels"
    return rel.parts[1] if len(rel.parts) > 2 else rel.stem


def _imports(path: Path) -> list[str]:
    """Every module name imported by a file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _layer(module: str) -> str | None:
    """Layer of an imported megamoe module, None for third-party ones."""
    parts = module.split(".")
    if parts[0] == "megamoe_kernels":
        return "megamoe_kernels"
    if parts[0] == "megamoe" and len(parts) > 1:
        return parts[1]
    return None


def test_no_backward_imports():
    files = list((ROOT / "megamoe").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
    bad = []
    for path in files:
        pkg = _package_of(path)
        if pkg not in LEVEL:
            continue
        for module in _imports(path):
            target = _layer(module)
            if target in LEVEL and target != pkg and LEVEL[target] >= LEVEL[pkg]:
                bad.append(f"{path.relative_to(ROOT)} imports {module} ({pkg} → {target})")
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN.get(pkg, ())):
                bad.append(f"{path.relative_to(ROOT)} imports forbidden {module}")
    assert not bad, "\n".join(bad)


def test_every_package_has_a_level():
    packages = {p.name for p in (ROOT / "megamoe").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LEVEL), f"add a layer level for {packages - set(LEVEL)}"


def test_cli_parser_does_not_import_torch():
    """Building `megamoe`'s parser (every command's start) leaves torch unimported: `megamoe data …` never needs it."""
    import subprocess
    import sys

    code = "import sys; from megamoe.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:] + res.stdout
