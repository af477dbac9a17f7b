"""Option types every command shares, checked by click before any model loads: a bad value is a usage error (exit 2)
that names the option, the value and what is allowed — the same rule on every command and on the plain and the
speculative paths alike.

Use them as ``type=`` of ``click.option``: counts (:data:`POSITIVE`, :data:`NON_NEGATIVE`), comma-separated lists
(:class:`IntList`, :class:`FloatList`), sampling settings (:data:`TEMPERATURE`, :data:`TOP_P`, :data:`TOP_K`),
:class:`Device`, :data:`DTYPE` and :class:`Output` paths (checked for writing before the work starts).
"""

from __future__ import annotations

import click

from ..errors import SkipLMError

POSITIVE = click.IntRange(min=1)  # token counts, repeats, batch sizes, threads
NON_NEGATIVE = click.IntRange(min=0)  # warm-up rounds, seeds
TEMPERATURE = click.FloatRange(min=0.0)  # 0 means greedy
TOP_P = click.FloatRange(min=0.0, max=1.0, min_open=True)
TOP_K = click.IntRange(min=0)  # 0 means no top-k filter
DTYPE = click.Choice(["float32", "bfloat16", "float16"])


class _List(click.ParamType):
    """Comma-separated numbers, each checked like the single value."""

    item: type = int

    def __init__(self, minimum: float | None = None, *, minimum_open: bool = False):
        self.minimum, self.minimum_open = minimum, minimum_open

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",")]
        numbers = []
        for part in parts:
            try:
                number = self.item(part)
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of {self.name}s ({part!r} is not one).", param, ctx)
            if self.minimum is not None and (number <= self.minimum if self.minimum_open else number < self.minimum):
                bound = f"greater than {self.minimum:g}" if self.minimum_open else f"at least {self.minimum:g}"
                self.fail(f"{value!r}: every value must be {bound}, got {part}.", param, ctx)
            numbers.append(number)
        return tuple(numbers)


class IntList(_List):
    name = "integer"
    item = int


class FloatList(_List):
    name = "number"
    item = float


class Device(click.ParamType):
    """A torch device this torch can use (see :func:`skiplm.models.devices.check_device`); the value stays a str."""

    name = "device"

    def convert(self, value, param, ctx):
        from ..models.devices import check_device

        try:
            check_device(value)
        except SkipLMError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


class Output(click.ParamType):
    """A path the command will write: a ``"file"`` or a ``"folder"``, checked now (see
    :func:`skiplm.files.check_output`) so a bad path fails before minutes of work, not after."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"{kind} path"

    def convert(self, value, param, ctx):
        from ..files import check_output

        try:
            return str(check_output(value, kind=self.kind))
        except SkipLMError as exc:
            self.fail(str(exc), param, ctx)


__all__ = ["DTYPE", "Device", "FloatList", "IntList", "NON_NEGATIVE", "Output", "POSITIVE", "TEMPERATURE", "TOP_K",
           "TOP_P"]
