"""One registry kind for everything skiplm can do by name: planners, planner presets, policies, draft kinds, corpora,
prompt sets (and, later, healing methods).

Each method registers itself where it is defined, with a :class:`Spec`: its name, the paper it implements, what it
needs (calibration text, a measured latency model), whether one run serves many targets (``nested``) and its options.
Commands, ``compare``, sweeps and the report iterate a registry instead of listing names, so a new method is one
module and one ``register(...)`` call (in the spirit of lm-evaluation-harness's ``Registry`` and peft's
``register_peft_method``)::

    @PLANNERS.register("uniform", paper="Liu et al. 2024, Unified Layer Skipping")
    def plan_uniform(model, *, speedup=None, skip=None, ...): ...

    PLANNERS.preset("similarity-attention", "similarity", unit="attention")   # a parameterised instance

A registry fills itself on first use by importing the package that defines its entries (``load=``), so
``PLANNERS.names()`` is complete whichever module asked first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from .errors import SkipLMError


class UnknownNameError(SkipLMError):
    """A name that no registered method, corpus or prompt set has."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method: how the CLI (``--option key=value`` or a generated flag) and the docs present it."""

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None

    def parse(self, text: str, owner: str) -> Any:
        """The value of ``key=text`` given on a command line for this option of ``owner``."""
        if self.choices is not None and text not in self.choices:
            raise SkipLMError(f"{owner}: option {self.name!r} must be one of {', '.join(self.choices)}, got {text!r}.")
        if self.type is bool:
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise SkipLMError(f"{owner}: option {self.name!r} is true or false, got {text!r}.")
            return lowered in ("1", "true", "yes", "on")
        try:
            return self.type(text)
        except (TypeError, ValueError):
            raise SkipLMError(f"{owner}: option {self.name!r} takes a {self.type.__name__}, got {text!r}.") from None


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registered entry. ``target`` is what runs (a planner function, a policy class, a corpus loader, ...).

    ``needs``: what the caller must supply, e.g. ``{"calibration"}`` (calibration text) or ``{"latency"}`` (a measured
    latency model); ``nested``: one run, taken to the largest target, serves every smaller target (its sets are
    nested), so ``compare`` and sweeps run it once; ``defaults``: fixed option values of a preset (a parameterised
    instance of another entry, e.g. ``similarity-attention`` is ``similarity`` with ``unit="attention"``);
    ``calibration``: the default calibration size (sequences, tokens each) of a data-driven method.
    """

    name: str
    target: Any
    kind: str
    summary: str = ""
    paper: str = ""
    needs: frozenset[str] = frozenset()
    nested: bool = False
    options: tuple[Option, ...] = ()
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: tuple[int, int] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def data_driven(self) -> bool:
        return "calibration" in self.needs

    def option(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise UnknownNameError(f"the {self.kind} {self.name!r} has no option {name!r}; its options: "
                               f"{', '.join(o.name for o in self.options) or 'none'}.")

    def parse_options(self, pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
        """``["unit=mlp", "iterative=true"]`` -> typed keyword arguments for this entry (for ``--option``)."""
        values: dict[str, Any] = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            if not sep or not key:
                raise SkipLMError(f"--option takes key=value, got {pair!r}.")
            values[key.strip().replace("-", "_")] = self.option(key.strip().replace("-", "_")).parse(text, self.name)
        return values


class Registry:
    """Named specs of one kind. ``load``: the module(s) whose import registers every built-in entry."""

    def __init__(self, kind: str, load: str | tuple[str, ...] = ()):
        self.kind = kind
        self._load = (load,) if isinstance(load, str) else tuple(load)
        self._specs: dict[str, Spec] = {}

    def _loaded(self) -> dict[str, Spec]:
        while self._load:  # import each defining module once (it registers its entries)
            module, self._load = self._load[0], self._load[1:]
            importlib.import_module(module)
        return self._specs

    # -- registering ----------------------------------------------------------------------------------------------
    def add(self, spec: Spec) -> Spec:
        if spec.name in self._specs:
            raise SkipLMError(f"a {self.kind} named {spec.name!r} is already registered.")
        self._specs[spec.name] = spec
        return spec

    def register(self, name: str, **spec: Any) -> Callable:
        """Decorator: register the decorated function or class under ``name`` (keywords: :class:`Spec`'s fields)."""
        def decorate(target):
            self.add(_spec(name, target, self.kind, spec))
            return target
        return decorate

    def preset(self, name: str, base: str, *, summary: str = "", **defaults: Any) -> Spec:
        """Register ``name`` as ``base`` with some options fixed (its spec otherwise ``base``'s)."""
        parent = self._specs[base]
        fixed = {**parent.defaults, **defaults}
        return self.add(dataclasses.replace(parent, name=name, defaults=fixed, summary=summary or parent.summary,
                                            options=tuple(o for o in parent.options if o.name not in fixed)))

    def remove(self, name: str) -> None:
        self._specs.pop(name, None)

    @contextlib.contextmanager
    def temporarily(self, name: str, target: Any, **spec: Any) -> Iterator[Spec]:
        """Register an entry for the duration of a ``with`` block (tests, notebooks)."""
        self._loaded()
        added = self.add(_spec(name, target, self.kind, spec))
        try:
            yield added
        finally:
            self.remove(name)

    # -- looking up -----------------------------------------------------------------------------------------------
    def get(self, name: str) -> Spec:
        specs = self._loaded()
        if name not in specs:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {', '.join(specs) or 'none'}.")
        return specs[name]

    def names(self) -> list[str]:
        return list(self._loaded())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[Spec]:
        return iter(list(self._loaded().values()))

    def __len__(self) -> int:
        return len(self._loaded())

    def describe(self) -> str:
        """``name (paper)`` for every entry, comma-separated: for help texts."""
        return ", ".join(self.names())


def _spec(name: str, target: Any, kind: str, fields: dict[str, Any]) -> Spec:
    fields = dict(fields)
    if "needs" in fields:
        fields["needs"] = frozenset(fields["needs"])
    if "options" in fields:
        fields["options"] = tuple(fields["options"])
    if not fields.get("summary"):
        doc = (getattr(target, "__doc__", None) or "").strip()
        fields["summary"] = doc.split("\n", 1)[0]
    return Spec(name=name, target=target, kind=kind, **fields)


# The registries. Each fills itself from the package that defines its entries.
PLANNERS = Registry("planner", load="skiplm.planners")
POLICIES = Registry("policy", load="skiplm.policies")
DRAFTS = Registry("draft kind", load="skiplm.speculative")
CORPORA = Registry("corpus", load="skiplm.models.data")
PROMPT_SETS = Registry("prompt set", load="skiplm.models.data")
SKIPPER_FILES = Registry("skipper file format", load=("skiplm.plan", "skiplm.policies", "skiplm.routers",
                                                         "skiplm.lora_drop"))
HEALERS = Registry("healing method", load="skiplm.heal")
ROUTERS = Registry("router kind", load="skiplm.routers")  # trained per-sequence routers (FiRST)
REUSE = Registry("layer-reuse method", load="skiplm.lora_drop")  # temporal reuse of layer outputs (LoRA-Drop)

__all__ = ["CORPORA", "DRAFTS", "HEALERS", "Option", "PLANNERS", "POLICIES", "PROMPT_SETS", "REUSE", "ROUTERS", "Registry",
           "SKIPPER_FILES", "Spec", "UnknownNameError"]
