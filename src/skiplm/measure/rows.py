"""The names of result rows: the full model's reserved name, and names for plan files that never collide with it or
with each other.

A result (``eval``, ``bench``, ``agree``) keys each row by name and compares every row with the full model's, so a
name that two configurations share would silently replace one with the other. :func:`plan_names` names plan files
by their file name without ``.json`` where that is unique (``plan``), else by the shortest path suffix that tells
them apart (``a/plan``, ``b/plan``); a plan file named ``full.json`` is named ``full.json``, never ``full``.
:func:`check_row_names` refuses a mapping in which a plan takes a reserved name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import DataError

FULL = "full"  # the full model's row in every result (also :data:`skiplm.measure.agreement.FULL`)
# rows bench adds for a plan NAME: "NAME (layers deleted)", "NAME (decisions only)"
DERIVED_SUFFIXES = (" (layers deleted)", " (decisions only)")


def plan_names(paths: Sequence[str | Path], *, reserved: Iterable[str] = (FULL,),
               folders: bool = False) -> dict[str, str | Path]:
    """A row name for each plan file in ``paths`` (in order): its file name without the extension where that is
    unique, else the shortest suffix of its path that is (``a/plan``, ``b/plan``); a name in ``reserved`` (the full
    model's) is replaced by the file name with its extension (``full.json``). The same file given twice is a
    :class:`~skiplm.errors.DataError`. ``folders``: the paths are folders, named whole (``heal-1.2`` has no
    extension to drop)."""
    reserved = set(reserved)
    seen: dict[Path, str | Path] = {}
    for given in paths:
        real = Path(given).resolve()
        if real in seen:
            raise DataError(f"plan file {given} is given twice (as {seen[real]} too): give each plan once.")
        seen[real] = given
    parts = [Path(os.path.abspath(given)).parts[1:] for given in paths]  # without the root
    depth = [1] * len(paths)

    def name(index: int) -> str:
        path_parts = parts[index]
        k = depth[index]
        stem = path_parts[-1] if folders else Path(path_parts[-1]).stem
        candidate = "/".join([*path_parts[-k:-1], stem]) if k > 1 else stem
        if candidate in reserved and k == 1 and path_parts[-1] not in reserved:
            return path_parts[-1]  # full.json: its own name, not the full model's
        return candidate

    while True:
        names = [name(i) for i in range(len(paths))]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 or n in reserved]
        growable = [i for i in clashing if depth[i] < len(parts[i])]
        if not growable:
            break
        for i in growable:
            depth[i] += 1
    if clashing:  # only when paths cannot be told apart by any suffix (cannot happen for distinct real files)
        raise DataError(f"plan files {', '.join(str(paths[i]) for i in clashing)} cannot be given distinct names.")
    return dict(zip(names, paths))


def check_row_names(names: Iterable[str], *, full_included: bool = False) -> None:
    """Refuse plan names that would take another row's place: :data:`FULL` (the full model's; allowed once when
    ``full_included``, as the full model itself) and the names bench gives derived rows."""
    names = list(names)
    plans = [n for n in names if n != FULL] if full_included else names
    if FULL in plans:
        raise DataError(f"a plan may not be named {FULL!r}: that name is the full model's row. Name it otherwise "
                        "(skiplm.measure.rows.plan_names names plan files so that they never collide).")
    for name in plans:
        for suffix in DERIVED_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in plans:
                raise DataError(f"a plan may not be named {name!r}: bench names a row of plan "
                                f"{name[: -len(suffix)]!r} so. Rename the plan file.")


__all__ = ["DERIVED_SUFFIXES", "FULL", "check_row_names", "plan_names"]
