"""Atomic file and directory writes: a crash never leaves a half-written result under its final name."""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_sibling(final: Path) -> Path:
    """A unique hidden path next to final (same filesystem, so rename is atomic)."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path via a temp file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_copy_file(src: Path, dst: Path) -> None:
    """Copy src to dst via a temp file + fsync + rename (and fsync dst's folder)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        fsync_path(tmp)
        os.replace(tmp, dst)
        fsync_path(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: object) -> None:
    """Write obj as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp dir; on success it is synced and renamed to final, on error it is removed.

    final must not exist yet: results are never overwritten in place. The writer holds a lock on
    its temp dir while it works, so remove_dead_temps(final) can tell a killed writer's leftovers
    from a live writer's work.
    """
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _locked_temp_dir(final)
    try:
        yield tmp
        fsync_tree(tmp)  # the data is on disk before the name says it is complete
        os.rename(tmp, final)
        fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def _locked_temp_dir(final: Path) -> tuple[Path, int]:
    """A new temp dir next to final and an open descriptor of it holding its lock."""
    while True:
        tmp = _temp_sibling(final)
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on folders here (NFS): cleaners then leave every temp alone
            return tmp, fd
        if os.fstat(fd).st_nlink > 0:
            return tmp, fd
        os.close(fd)  # a cleaner took it for a dead writer's between mkdir and lock: take another name


def remove_stale_temps(folder: Path) -> None:
    """Delete temp dirs/files left in folder by crashed writers of this module."""
    if not folder.is_dir():
        return
    for entry in folder.glob(".*.tmp-*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def remove_dead_temps(final: Path) -> list[Path]:
    """Delete the temp dirs of atomic_dir(final) whose writer is gone (killed); returns them.

    A live writer holds its temp dir's lock and is left alone, so this is safe while other
    processes write the same result.
    """
    removed = []
    pattern = f".{glob.escape(final.name)}.tmp-*"
    for entry in sorted(final.parent.glob(pattern)) if final.parent.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink() and _remove_if_dead(entry):
            removed.append(entry)
    return removed


def _remove_if_dead(entry: Path) -> bool:
    """Remove a temp dir if no live writer holds its lock; True if it was removed."""
    try:
        fd = os.open(entry, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live writer (or locks unsupported here): not ours to remove
        os.close(fd)
        return False
    try:
        shutil.rmtree(entry, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under folder (so a power loss after a rename finds complete files)."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_path(Path(root, name))
        fsync_path(Path(root))


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder: so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISK_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over the file-size limit, see `ulimit -f`)",
}
"""errno → what to tell the user."""
DISK_FULL_TEXT = {
    "No space left on device": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "os error 27": errno.EFBIG,
}
"""Messages of libraries (tokenizers, pyarrow) that report an OS error only as text."""


def disk_full_reason(err: BaseException) -> str | None:
    """'no space left on device' (or quota / file-size limit) if err or its causes say so, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return DISK_FULL[err.errno]
        text = str(err)
        for marker, code in DISK_FULL_TEXT.items():
            if marker in text:
                return DISK_FULL[code]
        err = err.__cause__ or err.__context__
    return None
