"""Cutting a Python module into documents: one per top-level definition, plus the rest of the module.

A definition is a top-level function (sync or async) or class, from its first decorator to its last
line, docstring included. The module's docstring, imports, comments and other top-level code stay
together, in order, as one more document. A module that does not parse (the stdlib ships a few
deliberately broken files) stays one document.
"""

from __future__ import annotations

import ast

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def split_definitions(text: str) -> list[str]:
    """The module's top-level definitions, then the rest of it (blank documents dropped)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
        return [text] if text.strip() else []
    lines = text.splitlines(keepends=True)
    taken = [False] * len(lines)
    documents = []
    for node in tree.body:
        if isinstance(node, DEFINITIONS):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            documents.append("".join(lines[first : node.end_lineno]))
            taken[first : node.end_lineno] = [True] * (node.end_lineno - first)
    rest = "".join(line for line, used in zip(lines, taken) if not used)
    return [doc for doc in [*documents, rest] if doc.strip()]
