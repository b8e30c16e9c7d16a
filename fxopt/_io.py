"""Atomic file writes: write to a temporary file in the target folder, then ``os.replace``.

A reader never sees a half-written ONNX model, dump or report, and a failed write leaves the
old file (if any) in place.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class OutputPathError(OSError):
    """The output path cannot be written; the message says which and why."""


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any expensive work, if ``path`` cannot be written."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise OutputPathError(f"{p} is a folder; give a file path (e.g. {p / 'model.onnx'})")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create the folder {parent} for {p}: {e.strerror or e}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {p}: the folder {parent} is not writable")
    try:                                   # root passes os.access everywhere; /proc, read-only mounts do not take files
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write {p}: creating a file in {parent} fails ({e.strerror or e}); "
                              "choose another folder") from e
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix or ".tmp", dir=p.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
