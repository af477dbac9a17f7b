"""Writing results safely: output paths are checked before long work starts, and files and folders appear whole or
not at all (written under a temporary name beside the target, then renamed), so an interrupted or failed run never
leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SkipLMError


class OutputError(SkipLMError):
    """An output path that cannot be written as asked."""


def check_output(path: str | Path, *, kind: str, what: str = "output") -> Path:
    """Raise :class:`OutputError` now, before any work, unless ``path`` can be written as a ``kind`` ("file" or
    "folder"): a folder may not be an existing file (or the reverse), and the nearest existing parent must take new
    entries. Creates nothing."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is an existing file, but a folder is written there: give a folder path.")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{what} {path} is an existing folder, but a file is written there: give a file path.")
    parent = path.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {parent} is a file, not a folder.")
    try:  # the only reliable test is to try (permissions, read-only mounts, /proc, ...)
        probe, name = tempfile.mkstemp(prefix=".skiplm-probe-", dir=parent)
        os.close(probe)
        os.unlink(name)
    except OSError as exc:
        raise OutputError(f"{what} {path} cannot be written: {parent} does not take new files "
                          f"({exc.strerror or exc}). Choose another path.") from None
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed over it when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path`` (yielded); on success it is renamed to ``path``, on any
    failure or interruption it is deleted. ``replace``: an existing ``path`` is swapped out (and deleted) at the end,
    else an existing non-empty ``path`` is refused up front."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is an existing file, but a folder is written there: give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise OutputError(f"{path} exists and is not empty: choose a new folder, or allow replacing it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(temporary, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["OutputError", "atomic_folder", "check_output", "write_text_atomic"]
