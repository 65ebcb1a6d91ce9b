"""Find the first bad record of a JSON-lines or JSON file, so an error can name its line.

HF datasets reads these files in large Arrow blocks and, on bad input, says only "An error
occurred while generating the dataset". Scanning a whole file in Python is slow on a large
corpus, so these scans run only after datasets has failed (or loaded nulls or non-text): the
normal path costs nothing. (Mixed types in other fields are fine: datasets reads them as Json.)
"""

from __future__ import annotations

import json
from pathlib import Path

JSON_TYPES = {
    dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
}  # fmt: skip


def _type_name(value: object) -> str:
    """The JSON name of a value's type ('a string', 'null', ...)."""
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    """A short rendering of a JSON value for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def record_problem(obj: object, text_field: str, domain_field: str) -> str | None:
    """What is wrong with one record for megamoe (None if nothing)."""
    if not isinstance(obj, dict):
        return f"not a JSON object (found {_type_name(obj)} {_shown(obj)}); every record must be an object"
    for field, key in ((text_field, "data.text_field"), (domain_field, "data.domain_field")):
        if not field:
            continue
        if field not in obj:
            return f"no '{field}' field ({key}; fields here: {', '.join(map(repr, obj)) or 'none'})"
        if obj[field] is None:
            return f"'{field}' is null; expected {'a string' if field == text_field else 'a value'}"
    if not isinstance(obj[text_field], str):
        return f"'{text_field}' is {_type_name(obj[text_field])} ({_shown(obj[text_field])}); expected a string"
    return None


def first_bad_line(path: Path, text_field: str, domain_field: str = "") -> str | None:
    """'FILE:LINE: what is wrong' for the first bad line of a JSON-lines file, or None if every line is fine."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"{path}:{lineno}: not valid UTF-8 (byte {err.start + 1} of the line)"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
            problem = record_problem(obj, text_field, domain_field)
            if problem:
                return f"{path}:{lineno}: {problem}"
    return None


def first_bad_json(path: Path, text_field: str, domain_field: str = "") -> str | None:
    """Like first_bad_line for a .json file: one JSON document (a list of records), or JSON lines."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except UnicodeDecodeError:
        return f"{path}: not valid UTF-8"
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # more than one document: JSON lines in a .json file
            return first_bad_line(path, text_field, domain_field)
        return f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(doc, list):
        return first_bad_line(path, text_field, domain_field)  # one object: read as a single JSON line
    for i, obj in enumerate(doc):
        problem = record_problem(obj, text_field, domain_field)
        if problem:
            return f"{path}: record {i + 1} of the top-level list: {problem}"
    return None
