"""Read each config field's one-line docstring and list every dotted key with its type and default."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import dataclass


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the string literal written right below it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs


@dataclass(frozen=True)
class KeyInfo:
    """One leaf config key."""

    key: str
    type_name: str
    default: object
    doc: str


def _type_name(tp: object) -> str:
    """Readable name of a field type (Literal choices spelled out)."""
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


class _Required:
    """The default of a list item's field that has none."""

    def __repr__(self) -> str:
        return "required"


def _item_record(tp: object) -> type | None:
    """X of a list[X] (or list[X] | None) field whose items are dataclasses (data.blend's sources)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0]
    return None


def iter_keys(cls: type, prefix: str = "") -> list[KeyInfo]:
    """Every leaf key under a config dataclass, in declaration order (a list's item fields as key[].field)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[KeyInfo] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(iter_keys(tp, key + "."))  # type: ignore[arg-type]
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = _Required() if default is dataclasses.MISSING else default
        out.append(KeyInfo(key, _type_name(tp), default, docs.get(f.name, "")))
        if (item := _item_record(tp)) is not None:
            out.extend(iter_keys(item, key + "[]."))
    return out


def keys_markdown(cls: type) -> str:
    """A markdown table of every key: the body of docs/config.md."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for info in iter_keys(cls):
        default = repr(info.default).replace("|", r"\|")
        type_name = info.type_name.replace("|", r"\|")
        rows.append(f"| `{info.key}` | {type_name} | `{default}` | {info.doc} |")
    return "\n".join(rows) + "\n"
