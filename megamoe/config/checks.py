"""Invariant checks shared by the config sections: each failure names its key."""

from __future__ import annotations

from megamoe.errors import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless ok."""
    if not ok:
        raise ConfigError(key, message)


def _positive(obj: object, *names: str) -> None:
    """Every named int/float field of obj is > 0."""
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, name, f"must be > 0, got {value}")


def _non_negative(obj: object, *names: str) -> None:
    """Every named int/float field of obj is >= 0."""
    for name in names:
        value = getattr(obj, name)
        _check(value >= 0, name, f"must be >= 0, got {value}")


def _nested(section: object, prefix: str) -> None:
    """Validate a section, prefixing the failing key with the section's name."""
    try:
        section.validate()  # type: ignore[attr-defined]
    except ConfigError as err:
        raise err.within(prefix) from None
