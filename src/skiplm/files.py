"""Writing results safely: output paths are checked before long work starts, and files and folders appear whole or
not at all (written under a temporary name beside the target, then renamed), so an interrupted or failed run never
leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, renamed over it when complete."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed over it when complete: an
    interrupted or failed write leaves the old file (or none), never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600; a result file is as readable as any other
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


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
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result is as readable as any folder
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = None
    try:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(temporary, path)
    except BaseException:  # the swap itself failed or was interrupted: put the old folder back
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path, error: type[Exception], remedy: str = "") -> Any:
    """The JSON a folder's record file holds, or ``error`` saying it is not valid JSON (e.g. truncated), and
    ``remedy``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); it may be truncated.{' ' + remedy if remedy else ''}") from None


def check_record(data: Any, *, format_name: str, schema_version: int, error: type[Exception], what: str,
                 where: Any) -> dict[str, Any]:
    """``data`` if it is a record of ``format_name`` (a JSON object whose ``"format"`` it names) at an integer
    ``schema_version`` this skiplm reads (at most ``schema_version``); else ``error``. ``what`` names the record
    ("a heal record"), ``where`` where it came from, in the messages."""
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise error(f"{where} is not {what} (expected \"format\": \"{format_name}\").")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > schema_version:
        raise error(f"{where} has schema version {version!r}; this skiplm reads up to {schema_version}: upgrade "
                    "skiplm, or make it again with this one.")
    return data


__all__ = ["OutputError", "atomic_folder", "check_output", "check_record", "read_json", "write_bytes_atomic",
           "write_text_atomic"]
