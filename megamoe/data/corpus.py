"""Document sources: the embedded corpus (Python stdlib sources) or user files read with HF datasets.

Every source becomes a `datasets.Dataset` with two string columns, `text` and `domain`.
HF datasets (and pyarrow) are imported where documents are read, not at import time: every
command imports this module (for the cache key), and datasets alone takes 1-2 s to import.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from megamoe.config import DataConfig
from megamoe.data.definitions import split_definitions
from megamoe.data.diagnose import first_bad_json, first_bad_line
from megamoe.errors import DataError
from megamoe.utils.fs import disk_full_reason

if TYPE_CHECKING:
    import datasets

EMBEDDED_SKIP = ("site-packages", "__pycache__", "__phello__")
"""Top-level stdlib folders that are not part of the embedded corpus."""

LOADERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text"}
EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}


def stdlib_root() -> Path:
    """The folder holding this interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_files() -> list[tuple[Path, str]]:
    """(path, domain) of every stdlib module; domain = top-level package ('toplevel' for modules)."""
    root = stdlib_root()
    found = []
    # os.walk with pruning: rglob would also walk site-packages (tens of thousands of files, ~2 s)
    for folder, subdirs, names in os.walk(root):
        top = Path(folder).relative_to(root).parts
        if not top:
            subdirs[:] = [d for d in subdirs if d not in EMBEDDED_SKIP and not d.startswith("config-")]
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    files = []
    for path in sorted(found):  # the order rglob gave: it is part of the cache key
        parts = path.relative_to(root).parts
        files.append((path, parts[0] if len(parts) > 1 else "toplevel"))
    return files


def _embedded_dataset(unit: str = "module") -> datasets.Dataset:
    """The embedded corpus: one document per stdlib module, or per top-level definition (data.embedded_unit)."""
    import datasets

    texts, domains = [], []
    for path, domain in embedded_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts = [text] if unit == "module" else split_definitions(text)
        texts += parts
        domains += [domain] * len(parts)
    return datasets.Dataset.from_dict({"text": texts, "domain": domains})


def resolve_files(cfg: DataConfig) -> list[Path]:
    """Files (or one saved dataset dir) named by data.path; errors name the key."""
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path)))
    if not matches:
        raise DataError(f"data.path: no file or directory matches '{cfg.path}'")
    for match in matches:
        if match.is_file() and match.stat().st_size == 0:
            raise DataError(f"data.path: file {match} is empty")
    return matches


def _file_format(path: Path, cfg: DataConfig) -> str:
    """The loader format of one file (data.format or its extension)."""
    if path.is_dir():
        return "saved"
    if cfg.format != "auto":
        return cfg.format
    fmt = EXTENSIONS.get(path.suffix)
    if fmt is None:
        known = ", ".join(sorted(EXTENSIONS))
        raise DataError(
            f"data.format: cannot tell the format of {path} from its extension; "
            f"set data.format (known extensions: {known})"
        )
    return fmt


def _read_one(path: Path, cfg: DataConfig, hf_cache: Path) -> datasets.Dataset:
    """One file or saved dataset dir as a Dataset (all columns)."""
    import datasets

    fmt = _file_format(path, cfg)
    try:
        if fmt == "saved":
            ds = datasets.load_from_disk(str(path))
            return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        if fmt == "arrow":
            return datasets.Dataset.from_file(str(path))
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        with _quiet_datasets():
            return datasets.load_dataset(
                LOADERS[fmt], data_files=str(path), split="train", cache_dir=str(hf_cache), **kwargs
            )
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        if disk_full_reason(err):
            raise DataError(
                f"data.cache_dir: {disk_full_reason(err)} while reading {path} into the datasets cache {hf_cache}; "
                "free space there or set data.cache_dir to a larger disk"
            ) from None
        bad = _first_bad_record(path, fmt, cfg)
        what = bad or f"cannot read {path} as {fmt}: {err}".splitlines()[0]
        raise DataError(f"data.path: {what}") from None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' own log lines while it loads (a bad file gets one error line from us instead)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_bad_record(path: Path, fmt: str, cfg: DataConfig) -> str | None:
    """'FILE:LINE: what is wrong' for the first bad record of a JSON(-lines) file; None for other formats."""
    if fmt == "jsonl":
        return first_bad_line(path, cfg.text_field, cfg.domain_field)
    if fmt == "json":
        return first_bad_json(path, cfg.text_field, cfg.domain_field)
    return None


def _valid_utf8(ds: datasets.Dataset, column: str) -> bool:
    """The column's strings are valid UTF-8 (Arrow does not check on load; this pass runs in C, at GB/s)."""
    import pyarrow as pa

    try:
        ds.data.column(column).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _has_nulls(ds: datasets.Dataset, column: str) -> bool:
    """Some rows lack the column or hold null there (Arrow counts nulls for free)."""
    return ds.data.column(column).null_count > 0


def _select_columns(ds: datasets.Dataset, path: Path, cfg: DataConfig) -> datasets.Dataset:
    """Keep text and domain columns, renamed to 'text' and 'domain'."""
    import datasets

    text_field = "text" if _file_format(path, cfg) == "text" else cfg.text_field
    if text_field not in ds.column_names:
        raise DataError(f"data.text_field: no column '{text_field}' in {path} (columns: {ds.column_names})")
    if cfg.domain_field and cfg.domain_field not in ds.column_names:
        raise DataError(f"data.domain_field: no column '{cfg.domain_field}' in {path} (columns: {ds.column_names})")
    feature = ds.features[text_field]
    is_text = getattr(feature, "dtype", None) in ("string", "large_string")
    utf8 = is_text and _valid_utf8(ds, text_field)
    if not utf8 or _has_nulls(ds, text_field) or (cfg.domain_field and _has_nulls(ds, cfg.domain_field)):
        bad = _first_bad_record(path, _file_format(path, cfg), cfg)
        if bad:
            raise DataError(f"data.path: {bad}")
    if not is_text:
        raise DataError(f"data.text_field: column '{text_field}' of {path} holds {feature}, not text")
    if not utf8:
        raise DataError(f"data.text_field: column '{text_field}' of {path} holds text that is not valid UTF-8")
    if cfg.domain_field:
        ds = ds.select_columns([text_field, cfg.domain_field])
        ds = ds.rename_columns({text_field: "text", cfg.domain_field: "domain"})
        return ds.cast_column("domain", datasets.Value("string"))
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.add_column("domain", [path.stem] * len(ds))


def load_documents(cfg: DataConfig, hf_cache: Path) -> datasets.Dataset:
    """All documents of the configured source, with columns text and domain."""
    import datasets

    if not cfg.path:
        return _embedded_dataset(cfg.embedded_unit)
    parts = [_select_columns(_read_one(p, cfg, hf_cache), p, cfg) for p in resolve_files(cfg)]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def source_fingerprint(cfg: DataConfig) -> str:
    """Hash of what the source is: file paths, sizes and modification times."""
    if not cfg.path:
        entries = [(str(p), p.stat().st_size, d) for p, d in embedded_files()]
        ident = {"embedded": sys.version, "files": entries}
    else:
        entries = []
        for root in resolve_files(cfg):
            files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
            entries += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        ident = {"files": entries}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cpu_count() -> int:
    """Usable CPU cores."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
