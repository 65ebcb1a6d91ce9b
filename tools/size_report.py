"""Review prompts for `make lint`: files over 500 lines and functions over 60 lines (not failures)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE, MAX_FUNC = 500, 60


def main() -> None:
    """Print every file and function over the limits."""
    notes = []
    for path in sorted(ROOT.glob("megamoe/**/*.py")) + sorted(ROOT.glob("kernels/**/*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if text.count("\n") > MAX_FILE:
            notes.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNC:
                    notes.append(f"{rel}:{node.lineno} {node.name}() is {length} lines")
    print("size review: " + ("; ".join(notes) if notes else "no file over 500 lines, no function over 60 lines"))


if __name__ == "__main__":
    main()
