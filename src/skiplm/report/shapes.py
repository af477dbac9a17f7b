"""What a result file must hold before anything reads it: each kind of result's fields, checked up front so a
wrong-shape or foreign file is refused by name with what is missing (never a ``KeyError`` from deep in a table).

A shape maps field paths to the type the field must have. A path is keys joined by dots; ``key[]`` means every item
of the list ``key``, ``key{}`` every value of the mapping ``key``: ``"points[].method": str`` asks for a list
``points`` of objects, each with a string ``method``. :func:`shape_problem` returns the first field that is missing
or of the wrong type, in words, or None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NUMBER = (int, float)  # bool is refused where a number is asked for (see _type_problem)
Shape = Mapping[str, type | tuple[type, ...]]

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def shape_problem(data: Any, shape: Shape) -> str | None:
    """The first field of ``shape`` that ``data`` lacks or holds with the wrong type ("settings is missing",
    "points[2].target is a string, not a number"), or None when ``data`` has the shape."""
    for path, kind in shape.items():
        problem = _check(data, path.split("."), kind, "")
        if problem:
            return problem
    return None


def _check(value: Any, parts: list[str], kind: Any, where: str) -> str | None:
    if not parts:
        return _type_problem(value, kind, where)
    key, markers = parts[0], []
    while key.endswith(("[]", "{}")):
        markers.insert(0, key[-2:])
        key = key[:-2]
    if not isinstance(value, dict):
        return f"{where or 'the top level'} is {_name(type(value))}, not an object"
    name = f"{where}.{key}" if where else key
    if key not in value:
        return f"{name} is missing"
    return _each(value[key], markers, parts[1:], kind, name)


def _each(value: Any, markers: list[str], rest: list[str], kind: Any, where: str) -> str | None:
    """Check ``rest`` on ``value``, or on every item of it for each marker ("[]": list items, "{}": mapping values)."""
    if not markers:
        return _check(value, rest, kind, where)
    if markers[0] == "[]":
        if not isinstance(value, list):
            return f"{where} is {_name(type(value))}, not a list"
        items = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    else:
        if not isinstance(value, dict):
            return f"{where} is {_name(type(value))}, not an object"
        items = [(f"{where}[{k!r}]", item) for k, item in value.items()]
    for item_name, item in items:
        problem = _each(item, markers[1:], rest, kind, item_name)
        if problem:
            return problem
    return None


def _type_problem(value: Any, kind: Any, where: str) -> str | None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if ok:
        return None
    wanted = "a number" if set(kinds) == set(NUMBER) else " or ".join(dict.fromkeys(_name(k) for k in kinds))
    return f"{where} is {_name(type(value))}, not {wanted}"


def _name(kind: type) -> str:
    return _TYPE_NAMES.get(kind, kind.__name__)


# -- the kinds skiplm report reads ----------------------------------------------------------------------------------
_MEASURE = {"median_s": NUMBER, "tokens_per_s": NUMBER, "speedup": NUMBER, "speedup_ci95": list,
            "ideal_speedup": NUMBER}

SHAPES: dict[str, Shape] = {
    "demo": {
        "corpora": list, "rows": list, "rows[].name": str, "rows[].what": str, "rows[].perplexity": dict,
        "rows[].speed": dict, "rows[].speed.kind": str, "speculative": dict, "speculative.rows": NUMBER,
        "speculative.identical_rows": NUMBER, "notes": list, "next": list, "seconds": dict, "seconds.total": NUMBER,
    },
    "speculative-bench": {
        "settings": dict, "settings.new_tokens": NUMBER, "settings.repeats": NUMBER, "drafts": dict,
        "drafts{}": str, "results": dict, "results{}.rows": NUMBER, "results{}.plain": dict,
        "results{}.plain.tokens_per_second": NUMBER, "overall": dict,
    },
    "sweep": {
        "settings": dict, "settings.bench": dict, "settings.bench.batch_sizes": list,
        **{f"settings.bench.{key}": NUMBER for key in ("prompt_tokens", "decode_prompt_tokens", "new_tokens",
                                                         "repeats", "warmup")},
        **{f"settings.{key}": NUMBER for key in ("tokens", "context", "stride", "limit", "agree_tokens", "sequences",
                                                   "length")},
        **{f"settings.{key}": str for key in ("corpus", "prompts", "calibration_corpus")},
        "settings.chat": bool,
        "points": list, "points[].method": str, "points[].target": NUMBER,
    },
    "planner-comparison": {"full_perplexity": NUMBER, "points": list, "points[].method": str,
                           "points[].target": NUMBER},
    "speed": {
        "settings": dict, **{f"settings.{key}": NUMBER for key in ("prompt_tokens", "decode_prompt_tokens",
                                                                   "new_tokens")},
        "speed": dict, "speed{}": dict, **{f"speed{{}}{{}}.{key}": kind for key, kind in _MEASURE.items()},
    },
    "perplexity": {
        "settings": dict, **{f"settings.{key}": NUMBER for key in ("tokens", "context", "stride")},
        "plans": dict, "perplexity": dict, "perplexity{}{}.perplexity": NUMBER,
    },
    "generation-agreement": {
        "settings": dict, "settings.count": NUMBER, "settings.prompts": str, "settings.new_tokens": NUMBER,
        "settings.decoding": str, "summary": dict, "summary{}": dict,
    },
}

__all__ = ["NUMBER", "SHAPES", "Shape", "shape_problem"]
