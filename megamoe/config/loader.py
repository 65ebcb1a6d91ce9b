"""Build a Config from YAML files (with `base:` inheritance) and dotted `key=value` overrides.

Precedence, lowest first: dataclass defaults, the base chain (each base's own bases first), the
file itself, then command-line overrides. Every key is checked against the typed tree: an
unknown key is an error that names where it was set and suggests the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import yaml

from megamoe.config.schema import Config
from megamoe.errors import ConfigError
from megamoe.utils.fs import atomic_write_text

CLI = "a command-line override"

Flat = dict[str, object]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults ← YAML chain at path ← overrides, validated."""
    flat: Flat = {}
    origins: dict[str, str] = {}
    if path is not None:
        _read_chain(Path(path), flat, origins, ())
    for item in overrides:
        key, value = parse_override(item)
        flat[key] = value
        origins[key] = CLI
    cfg = build_config(flat, origins)
    if path is not None and not cfg.train.name:
        cfg.train.name = Path(path).stem
    return cfg


def build_config(flat: Flat, origins: dict[str, str] | None = None) -> Config:
    """A validated Config from a flat {dotted key: value} mapping."""
    origins = origins or {}
    _reject_unknown(flat, origins)
    cfg = _build(Config, flat, "", origins)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of a Config (YAML-ready)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), config_to_yaml(cfg))


def parse_override(item: str) -> tuple[str, object]:
    """'a.b=value' → ('a.b', YAML-parsed value)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(item, "an override must look like section.key=value")
    if raw.strip() == "":
        return key, ""
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        return key, raw


def _read_chain(path: Path, flat: Flat, origins: dict[str, str], stack: tuple[Path, ...]) -> None:
    """Merge the file at path (its bases first) into flat."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError("base", f"circular base chain: {chain}")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str):
            raise ConfigError("base", f"in {path}: expected a path or a list of paths, got {base!r}")
        _read_chain(path.parent / base, flat, origins, (*stack, path))
    for key, value in _flatten(data, "", path).items():
        flat[key] = value
        origins[key] = str(path)


def _read_yaml(path: Path) -> dict:
    """One YAML file as a mapping, with errors that name the file and line."""
    if not path.is_file():
        raise ConfigError("", f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError("", f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping of sections at the top level")
    return data


def _flatten(data: dict, prefix: str, path: Path) -> Flat:
    """Nested mapping → {dotted key: leaf value}."""
    out: Flat = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + ".", path))
        elif value is None and not prefix:
            continue  # an empty section header
        else:
            out[dotted] = value
    return out


def _leaf_types(cls: type, prefix: str = "") -> dict[str, object]:
    """Every leaf key of a config dataclass → its annotated type."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _reject_unknown(flat: Flat, origins: dict[str, str]) -> None:
    """Raise for the first key that is not in the typed tree, with a suggestion."""
    valid = list(_leaf_types(Config))
    for key in flat:
        if key in valid:
            continue
        where = origins.get(key, CLI)
        hint = suggest_key(key, valid)
        tail = f"; did you mean '{hint}'?" if hint else ""
        raise ConfigError(key, f"unknown config key (in {where}){tail}")


def suggest_key(key: str, valid: Sequence[str]) -> str | None:
    """A valid key with the same last component (in another section), else the closest spelling."""
    last = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == last]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
    close = difflib.get_close_matches(last, list(leaves), n=1, cutoff=0.6)
    return leaves[close[0]] if close else None


def _build(cls: type, flat: Flat, prefix: str, origins: dict[str, str]):
    """Instantiate cls, taking each field from flat when present (recursing into sections)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, flat, key + ".", origins)  # type: ignore[arg-type]
        elif key in flat:
            kwargs[f.name] = coerce(flat[key], tp, key, origins.get(key, CLI))
    return cls(**kwargs)


def coerce(value: object, tp: object, key: str, where: str = CLI) -> object:
    """Check value against the annotated type tp (with the few safe conversions)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None`: None, or an X
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return coerce(value, inner, key, where)
    if dataclasses.is_dataclass(tp):
        return _coerce_record(value, tp, key, where)  # type: ignore[arg-type]
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r} (in {where})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r} (in {where})")
        (item_tp,) = typing.get_args(tp)
        return [coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    return _coerce_scalar(value, tp, key, where)


def _coerce_record(value: object, tp: type, key: str, where: str) -> object:
    """A mapping (a list item such as one data.blend source) → the dataclass tp, each field checked."""
    fields = {f.name: f for f in dataclasses.fields(tp)}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping with keys {', '.join(fields)}, got {value!r} (in {where})")
    for name in value:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            tail = f"; did you mean '{close[0]}'?" if close else f" (keys: {', '.join(fields)})"
            raise ConfigError(f"{key}.{name}", f"unknown key (in {where}){tail}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in value:
            raise ConfigError(f"{key}.{name}", f"is required (in {where})")
    hints = typing.get_type_hints(tp)
    return tp(**{name: coerce(v, hints[name], f"{key}.{name}", where) for name, v in value.items()})


def _coerce_scalar(value: object, tp: object, key: str, where: str) -> object:
    """bool/int/float/str checks; floats accept ints and YAML's '1e-3' strings."""
    bad = ConfigError(key, f"expected {getattr(tp, '__name__', tp)}, got {value!r} (in {where})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")
