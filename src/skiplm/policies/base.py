"""What every halting policy shares: :class:`HaltingPolicy` (settings, the per-token halting state, the skipper
protocol), looking a policy up by its registered name (:func:`make_policy`), and the policy file format
(``"format": "skiplm.policy"``, read by :func:`policy_from_json`; registered in :data:`~skiplm.registry.SKIPPER_FILES`).

A policy is registered where it is defined (:func:`register_policy`), with its paper and its own options
(``window``, ``parts``, ...)::

    @register_policy("ffn-skip", paper="Jaiswal et al. 2024, FFN-SkipLLM", options=[Option("window", int, 2, ...)])
    @dataclasses.dataclass
    class FFNSkip(HaltingPolicy):
        threshold_range = (-1.0, 1.0)  # where calibration looks for the threshold
        ...

so :func:`make_policy`, :func:`~skiplm.policies.calibrate`, :func:`policy_from_json` and ``skiplm policy`` take any
registered name, presets included (``lac-mlp`` is ``lac`` with ``parts="mlp"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..files import write_text_atomic
from ..plan import PHASES, ModelIdentity, check_made_for, model_identity
from ..registry import POLICIES, SKIPPER_FILES, Spec, UnknownNameError
from ..runtime.hooks import install_handle
from .runtime import PolicyHandle

FORMAT_NAME = "skiplm.policy"
SCHEMA_VERSION = 1
CALIBRATION = (4, 256)  # the calibration text a policy is calibrated on unless told otherwise: sequences, tokens each


@dataclasses.dataclass
class HaltingPolicy:
    """Shared machinery of per-token halting policies. Subclasses define :meth:`_signal` (which tokens settle at a
    layer), their own settings (dataclass fields) and the class attributes below. Settings are per phase:
    ``thresholds[phase]`` None means that phase runs in full.

    A policy object carries per-forward state (which tokens halted); one policy object serves one model at a time.
    """

    num_layers: int
    thresholds: dict[str, float | None]
    protect_first: int | None = None  # None: ceil(num_layers / 8) (4 of 30)
    protect_last: int | None = None  # None: ceil(num_layers / 16) (2 of 30)
    warmup: int = 4
    last_check: int | None = None  # None: the last layer whose signal can still halt a token (layers - protect_last - 2)
    model: ModelIdentity | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    method = "halting"  # the name the policy is registered under (and its files carry)
    threshold_name = "threshold"  # what its threshold is called in descriptions
    threshold_range = (0.0, 1.0)  # where calibration bisects for the threshold
    more_skips_with_larger = True  # does a larger threshold halt more tokens (the direction of the bisection)?
    skips_attention = False  # do halted tokens drop their attention contribution too?
    observes_mlp_input = True  # the signal reads the residual entering the MLP branch
    input_adaptive = True  # the skipper protocol: what it skips depends on the input (its handle counts it: stats)

    def __post_init__(self):
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise PlanError(f"num_layers must be a positive integer, got {self.num_layers!r}.")
        unknown = set(self.thresholds) - set(PHASES)
        if unknown:
            raise PlanError(f"{self.method}: thresholds are per phase (prefill, decode); unknown {sorted(unknown)}.")
        self.thresholds = {phase: self.thresholds.get(phase) for phase in PHASES}
        if self.protect_first is None:
            self.protect_first = -(-self.num_layers // 8)
        if self.protect_last is None:
            self.protect_last = -(-self.num_layers // 16)
        for phase, value in self.thresholds.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise PlanError(f"{self.method}: the {phase} threshold must be a number or None, got {value!r}.")
        for name in ("protect_first", "protect_last", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanError(f"{self.method}: {name} must be a non-negative integer, got {value!r}.")
        if self.protect_first < 1:
            raise PlanError(f"{self.method}: protect_first must be at least 1 (a decision needs a layer's signal).")
        if self.protect_first + self.protect_last >= self.num_layers:
            raise PlanError(
                f"{self.method}: protect_first={self.protect_first} and protect_last={self.protect_last} protect every "
                f"one of the {self.num_layers} layers, so nothing could be skipped; lower them."
            )
        self._skippable = range(self.protect_first, self.num_layers - self.protect_last)
        latest = self._skippable.stop - 2  # a signal decides the next layer, which must be skippable
        if self.last_check is None:
            self.last_check = latest
        if (isinstance(self.last_check, bool) or not isinstance(self.last_check, int)
                or not self.protect_first - 1 <= self.last_check <= latest):
            raise PlanError(f"{self.method}: last_check must be a layer from {self.protect_first - 1} to {latest} (the "
                            f"last layer whose signal may halt a token), got {self.last_check!r}.")
        self._state: dict[str, Any] = {}

    # -- what the runtime calls
    @property
    def skippable(self) -> range:
        return self._skippable

    @property
    def observed(self) -> range:
        """The layers whose output the policy reads: from the first that can matter to ``last_check``."""
        return range(self._first_observed(), self.last_check + 1)

    def _first_observed(self) -> int:
        return 0

    def begin(self, phase: str, batch: int, tokens: int, start: int, device: torch.device) -> None:
        """A forward pass starts: ``tokens`` new tokens per row at positions ``start``, ``start + 1``, ...

        One token (batch-1 decode, the hot path) keeps its state in Python numbers: a handful of tensor ops per
        layer would cost more than the MLPs the policy saves.
        """
        scalar = batch * tokens == 1
        if scalar:
            warm = start < self.warmup
        else:
            warm = (torch.arange(start, start + tokens, device=device) < self.warmup).expand(batch, tokens)
        threshold = self.thresholds[phase]
        self._state = {
            "active": threshold is not None,
            "threshold": threshold,
            "scalar": scalar,
            "halted": False if scalar else torch.zeros(batch, tokens, dtype=torch.bool, device=device),
            "warm": warm,
            "any_halted": False,
            "all_halted": False,
        }
        self._begin_signal()

    def run_mask(self, layer: int, part: str) -> torch.Tensor | bool | None:
        """Which tokens run ``part`` of ``layer``: None (every token), False (none), or a [batch, tokens] bool mask."""
        state = self._state
        if not state.get("any_halted") or layer not in self._skippable:
            return None
        if part == "attention" and not self.skips_attention:
            return None
        if state["all_halted"]:
            return False
        return ~state["halted"]

    def observe(self, layer: int, layer_input: torch.Tensor, mlp_input: torch.Tensor | None,
                layer_output: torch.Tensor) -> None:
        """Layer ``layer`` ran: update which tokens have halted (their next skippable layers will be skipped)."""
        state = self._state
        if not state.get("active") or state["all_halted"] or layer > self.last_check:
            return
        settled = self._signal(layer, layer_input, mlp_input, layer_output, state["threshold"])
        if state["scalar"]:  # halting is for good, as in the tensor path below
            halted = state["halted"] = state["halted"] or (bool(settled) and not state["warm"])
            state["any_halted"] = state["all_halted"] = halted and layer + 1 >= self.protect_first
            return
        halted = state["halted"] = state["halted"] | (settled & ~state["warm"])
        if layer + 1 >= self.protect_first:  # only then can a decision take effect
            state["any_halted"] = bool(halted.any())
            state["all_halted"] = state["any_halted"] and bool(halted.all())

    def _values(self, tensor: torch.Tensor) -> torch.Tensor | float:
        """A per-token signal as the state keeps it: [batch, tokens], or a float for one token."""
        return tensor.item() if self._state["scalar"] else tensor

    def _begin_signal(self) -> None:
        """Reset the signal's per-forward state."""

    def _signal(self, layer, layer_input, mlp_input, layer_output, threshold) -> torch.Tensor | bool:
        """Which tokens settled at ``layer`` (a bool, or a [batch, tokens] mask)."""
        raise NotImplementedError

    # -- description and files
    def settings(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds), "protect_first": self.protect_first,
                "protect_last": self.protect_last, "warmup": self.warmup, "last_check": self.last_check}

    def describe(self) -> str:
        phases = ", ".join(f"{p} {self._format_threshold(v)}" for p, v in self.thresholds.items())
        ratio = self.provenance.get("calibrated_skip_ratio")
        calibrated = f"; {ratio:.0%} of MLPs skipped on calibration text" if isinstance(ratio, float) else ""
        checks = "" if self.last_check == self.skippable.stop - 2 else f", halting decided up to layer {self.last_check}"
        return (f"{self.method} ({phases}; layers {self.skippable.start}-{self.skippable.stop - 1} skippable{checks}, "
                f"first {self.warmup} positions full{calibrated})")

    def _format_threshold(self, value: float | None) -> str:
        return "full" if value is None else f"{self.threshold_name} {value:.4g}"

    def is_empty(self) -> bool:
        return all(value is None for value in self.thresholds.values())

    def teacher_forced(self) -> HaltingPolicy:
        """The policy for scoring text in one forward (perplexity): every token decides as in decode."""
        return dataclasses.replace(self, thresholds={"prefill": self.thresholds["decode"],
                                                     "decode": self.thresholds["decode"]})

    def check_model(self, model: nn.Module) -> None:
        check_made_for(model, self.num_layers, self.model, what="policy",
                       remedy="Calibrate a policy for this model with `skiplm policy`")

    def install(self, model: nn.Module, *, check_model: bool = True, dry_run: bool = False,
                record: bool = False) -> PolicyHandle:
        """Apply this policy to ``model`` (the skipper protocol; :func:`skiplm.apply` calls this). ``dry_run``: decide
        but skip nothing; ``record``: keep an :class:`~skiplm.policies.ActivationMap` per forward in ``handle.maps``."""
        return install_handle(self, model, lambda: PolicyHandle(model, self, dry_run=dry_run, record=record),
                              check_model=check_model, what="policy")

    def for_model(self, model: nn.Module) -> HaltingPolicy:
        identity = model_identity(model)
        if identity.num_layers != self.num_layers:
            raise PlanError(f"this policy covers {self.num_layers} layers but the model has {identity.num_layers}.")
        return dataclasses.replace(self, model=identity)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "method": self.method,
                "num_layers": self.num_layers, "description": self.describe(), "settings": self.settings(),
                "model": self.model.to_json() if self.model else None, "provenance": self.provenance}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")  # whole or not at all


def register_policy(name: str, **spec: Any) -> Callable[[type[HaltingPolicy]], type[HaltingPolicy]]:
    """Register a :class:`HaltingPolicy` subclass in :data:`~skiplm.registry.POLICIES` as ``name``, which becomes its
    ``method`` (what its files say). ``spec``: :class:`~skiplm.registry.Spec`'s fields; a policy needs calibration
    text (``calibration`` defaults to :data:`CALIBRATION`)."""
    def decorate(policy_class: type[HaltingPolicy]) -> type[HaltingPolicy]:
        policy_class.method = name
        fields = {"needs": {"calibration"}, "calibration": CALIBRATION, **spec}
        return POLICIES.register(name, **fields)(policy_class)
    return decorate


def policy_spec(name: str) -> Spec:
    """The registered policy ``name`` (a preset too): its class is ``.target``, a preset's fixed settings
    ``.defaults``. An unknown name is a :class:`~skiplm.errors.PlanError` that lists the registered ones."""
    try:
        return POLICIES.get(name)
    except UnknownNameError as exc:
        raise PlanError(str(exc)) from None


def policy_settings(spec: Spec, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the fixed settings of a preset filled in (a preset's fixed setting cannot be changed)."""
    changed = sorted(key for key, value in spec.defaults.items() if key in settings and settings[key] != value)
    if changed:
        fixed = ", ".join(f"{key}={spec.defaults[key]!r}" for key in changed)
        raise PlanError(f"the policy {spec.name!r} fixes {fixed}; use its base policy to set {', '.join(changed)}.")
    return {**spec.defaults, **settings}


def make_policy(method: str, num_layers: int, threshold: float | None = None, *,
                prefill_threshold: float | None | str = "same", **settings: Any) -> HaltingPolicy:
    """A policy of the registered ``method`` with one threshold for decode and ``prefill_threshold`` for prefill
    ("same": the same; None: prefill runs in full)."""
    spec = policy_spec(method)
    prefill = threshold if prefill_threshold == "same" else prefill_threshold
    return spec.target(num_layers, {"prefill": prefill, "decode": threshold}, **policy_settings(spec, settings))


def is_policy(obj: Any) -> bool:
    return isinstance(obj, HaltingPolicy)


def apply_policy(model: nn.Module, policy: HaltingPolicy, *, check_model: bool = True, dry_run: bool = False,
                 record: bool = False) -> PolicyHandle:
    """:func:`skiplm.apply` for policies only (refusing anything else): apply ``policy`` until the returned handle is
    removed. ``dry_run``: decide but skip nothing (to measure the decision overhead); ``record``: keep an
    :class:`~skiplm.policies.ActivationMap` per forward in ``handle.maps``."""
    if not isinstance(policy, HaltingPolicy):
        raise PlanError(f"apply_policy() needs a policy, got {type(policy).__name__}.")
    return policy.install(model, check_model=check_model, dry_run=dry_run, record=record)


def policy_from_json(data: Any) -> HaltingPolicy:
    """The policy a policy file holds (a file written by any skiplm version with this schema)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise PlanError(f"not a skiplm policy: expected an object with \"format\": \"{FORMAT_NAME}\".")
    if not isinstance(data.get("schema_version"), int) or data["schema_version"] > SCHEMA_VERSION:
        raise PlanError(f"policy schema version {data.get('schema_version')!r} is not one this skiplm understands "
                        f"({SCHEMA_VERSION}); upgrade skiplm or re-create the policy with `skiplm policy`.")
    method = data.get("method")
    if not isinstance(method, str) or method not in POLICIES:
        raise PlanError(f"policy method {method!r} is unknown; available: {', '.join(POLICIES.names())}.")
    spec = POLICIES.get(method)
    settings = data.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("thresholds"), dict):
        raise PlanError("policy has no 'settings' with 'thresholds'; the file may be truncated or hand-edited.")
    fields = {f.name for f in dataclasses.fields(spec.target)} - {"num_layers", "model", "provenance"}
    unknown = set(settings) - fields
    if unknown:
        raise PlanError(f"policy settings {sorted(unknown)} are unknown to {method}; allowed: {sorted(fields)}.")
    model = ModelIdentity.from_json(data["model"]) if data.get("model") is not None else None
    try:
        return spec.target(num_layers=data.get("num_layers"), model=model,
                           provenance=dict(data.get("provenance") or {}), **policy_settings(spec, settings))
    except TypeError as exc:
        raise PlanError(f"policy settings are malformed: {exc}") from None


SKIPPER_FILES.add(Spec(name=FORMAT_NAME, target=policy_from_json, kind=SKIPPER_FILES.kind,
                       summary="an input-adaptive policy (`skiplm policy`)"))
