"""Input-adaptive skipping: policies that decide, per token, which sublayers run — and the runtime that executes them.

A static :class:`~skiplm.plan.SkipPlan` is the special case of a policy that never looks at the input. A *policy*
sees the residual stream as the forward pass goes (layer by layer, prefill or decode, token positions) and returns,
for each layer, a mask of the tokens whose MLP (and, for some policies, attention contribution) runs.

Policies here are *halting* policies: a token runs every layer until a per-token signal says it has settled, then
skips the skippable sublayers of the remaining layers (the first ``protect_first`` and the last ``protect_last``
layers, and the first ``warmup`` tokens, always run). Two signals:

* ``ffn-skip`` (FFN-SkipLLM, Jaiswal et al. 2024): the MLP has saturated — cos(MLP input, MLP output) of the
  residual stream stayed above ``threshold`` for ``window`` consecutive layers. Attention always runs.
* ``lac`` (L2 Adaptive Computation; "Void in Language Models"): the change of the residual's L2 norm across the last
  layer fell under ``alpha x (max - min)`` of the token's earlier per-layer changes. Separate ``alpha`` for prefill
  and decode (None: that phase runs in full). ``parts="layer"`` drops the whole layer's contribution for halted
  tokens (attention and MLP), ``parts="mlp"`` only the MLP.

Execution (how a decision becomes saved time):

* a skipped **MLP** does not run for that token: at batch 1 in decode the MLP call is replaced by a zero; with many
  tokens, the MLP runs on the gathered rows that need it and zeros are scattered for the rest. Branch norms still run
  (a norm of zeros is zero, so post-norm families stay exact).
* a skipped **attention** (``lac`` with ``parts="layer"``) still *runs*, so the token's keys and values are written to
  the cache exactly as the full layer would write them from that token's residual; only its contribution to the
  residual is dropped. KV-cache rule: no hole, nothing to prove — but also no time saved on attention; the time a
  skipped layer saves is its MLP's. (Writing only K/V without the query path needs per-family projection code, which
  skiplm does not copy.)

Decisions are made before the sublayer they govern runs, from what the token has already computed: the signal of
layer l-1 decides layer l. Only the layers whose signal can matter are read, up to ``last_check`` (the last layer
whose signal may halt a token; :func:`calibrate` picks it where later halts stop paying for their checks): at batch-1
decode on CPU a check costs ~45 us, because every small op between the model's large matrix products runs with cold
caches. The per-token overhead is measured by ``skiplm bench --policy`` (``dry_run`` decides but skips nothing).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters import count_layers, get_adapter, _get_path
from ..errors import PlanError
from ..plan import ModelIdentity, check_made_for, model_identity
from ..registry import SKIPPER_FILES, Spec
from ..runtime.hooks import Installed, attach, cache_from, check_free, check_layers, decoder_stack

FORMAT_NAME = "skiplm.policy"
SCHEMA_VERSION = 1
PHASES = ("prefill", "decode")


# -- policies -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HaltingPolicy:
    """Shared machinery of per-token halting policies. Subclasses define :meth:`_signal` (which tokens settle at a
    layer) and their thresholds. Settings are per phase: ``thresholds[phase]`` None means that phase runs in full.

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

    method = "halting"
    skips_attention = False
    observes_mlp_input = True  # the signal reads the residual entering the MLP branch

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
        return "full" if value is None else f"{self._threshold_name} {value:.4g}"

    _threshold_name = "threshold"

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
        but skip nothing; ``record``: keep an :class:`ActivationMap` per forward in ``handle.maps``."""
        check_free(model)
        check_layers(self, model, check_model, "policy")
        return attach(model, PolicyHandle(model, self, dry_run=dry_run, record=record))

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
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


@dataclasses.dataclass
class FFNSkip(HaltingPolicy):
    """FFN-SkipLLM: a token skips the MLPs of the remaining skippable layers once cos(MLP input, MLP output) of its
    residual stream has been above the threshold for ``window`` consecutive layers. Attention always runs."""

    window: int = 2

    method = "ffn-skip"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PlanError(f"ffn-skip: window must be a positive integer, got {self.window!r}.")

    def _first_observed(self) -> int:
        # a decision that takes effect needs the `window` layers before the first skippable one, no earlier ones
        return max(0, self.protect_first - self.window)

    def _begin_signal(self) -> None:
        self._state["streak"] = 0 if self._state["scalar"] else torch.zeros_like(self._state["halted"], dtype=torch.int32)

    def _signal(self, layer, layer_input, mlp_input, layer_output, threshold) -> torch.Tensor | bool:
        saturated = _cosine(mlp_input, layer_output, self._state["scalar"]) > threshold
        streak = self._state["streak"] = (self._state["streak"] + 1) * saturated  # reset to 0 when not saturated
        return streak >= self.window

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "window": self.window}


@dataclasses.dataclass
class LAC(HaltingPolicy):
    """L2 Adaptive Computation: a token halts once the L2-norm change of its residual across a layer,
    | ||h_out|| - ||h_in|| |, falls under ``alpha x (max - min)`` of its changes at the earlier layers. Halted tokens
    skip the remaining skippable layers (``parts="layer"``: attention contribution and MLP; ``"mlp"``: the MLP)."""

    parts: str = "layer"

    method = "lac"
    _threshold_name = "alpha"
    observes_mlp_input = False

    def __post_init__(self):
        super().__post_init__()
        if self.parts not in ("layer", "mlp"):
            raise PlanError(f"lac: parts must be 'layer' or 'mlp', got {self.parts!r}.")

    @property
    def skips_attention(self) -> bool:  # type: ignore[override]
        return self.parts == "layer"

    def _begin_signal(self) -> None:
        self._state.update(norm=None, low=None, high=None, seen=0)

    def _signal(self, layer, layer_input, mlp_input, layer_output, alpha) -> torch.Tensor | bool:
        state = self._state
        before = state["norm"] if state["norm"] is not None else self._values(_norm(layer_input))
        after = state["norm"] = self._values(_norm(layer_output))
        change = abs(after - before)
        low, high = state["low"], state["high"]
        settled = state["seen"] >= 2 and change < alpha * (high - low)  # a range needs two earlier changes
        if state["scalar"]:
            state["low"] = change if low is None else min(low, change)
            state["high"] = change if high is None else max(high, change)
        else:
            settled = settled if state["seen"] >= 2 else torch.zeros_like(state["halted"])
            state["low"] = change if low is None else torch.minimum(low, change)
            state["high"] = change if high is None else torch.maximum(high, change)
        state["seen"] += 1
        return settled

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "parts": self.parts}


def _norm(hidden: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(hidden, dim=-1)  # half the time of Tensor.norm on one token


def _cosine(a: torch.Tensor, b: torch.Tensor, scalar: bool) -> torch.Tensor | float:
    """Per-token cosine of two [batch, tokens, hidden] tensors; a float for one token (one 2x2 Gram matrix: on CPU,
    half the time of F.cosine_similarity)."""
    if not scalar:
        return F.cosine_similarity(a, b, dim=-1)
    pair = torch.cat((a, b)).view(2, -1)
    (aa, ab), (_, bb) = torch.mm(pair, pair.t()).tolist()
    return ab / max(math.sqrt(aa * bb), 1e-8)


POLICIES: dict[str, type[HaltingPolicy]] = {"ffn-skip": FFNSkip, "lac": LAC}
# What a larger threshold does: cos threshold (ffn-skip) -> fewer skips; alpha (lac) -> more skips.
_MORE_SKIPS_WITH_LARGER = {"ffn-skip": False, "lac": True}
_THRESHOLD_RANGE = {"ffn-skip": (-1.0, 1.0), "lac": (0.0, 1.0)}


def make_policy(method: str, num_layers: int, threshold: float | None = None, *,
                prefill_threshold: float | None | str = "same", **settings: Any) -> HaltingPolicy:
    """A policy of ``method`` with one threshold for decode and ``prefill_threshold`` for prefill ("same": the same;
    None: prefill runs in full)."""
    if method not in POLICIES:
        raise PlanError(f"unknown policy {method!r}; available: {', '.join(POLICIES)}.")
    prefill = threshold if prefill_threshold == "same" else prefill_threshold
    return POLICIES[method](num_layers, {"prefill": prefill, "decode": threshold}, **settings)


def is_policy(obj: Any) -> bool:
    return isinstance(obj, HaltingPolicy)


def policy_from_json(data: Any) -> HaltingPolicy:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise PlanError(f"not a skiplm policy: expected an object with \"format\": \"{FORMAT_NAME}\".")
    if not isinstance(data.get("schema_version"), int) or data["schema_version"] > SCHEMA_VERSION:
        raise PlanError(f"policy schema version {data.get('schema_version')!r} is not one this skiplm understands "
                        f"({SCHEMA_VERSION}); upgrade skiplm or re-create the policy with `skiplm policy`.")
    method = data.get("method")
    if method not in POLICIES:
        raise PlanError(f"policy method {method!r} is unknown; available: {', '.join(POLICIES)}.")
    settings = data.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("thresholds"), dict):
        raise PlanError("policy has no 'settings' with 'thresholds'; the file may be truncated or hand-edited.")
    fields = {f.name for f in dataclasses.fields(POLICIES[method])} - {"num_layers", "model", "provenance"}
    unknown = set(settings) - fields
    if unknown:
        raise PlanError(f"policy settings {sorted(unknown)} are unknown to {method}; allowed: {sorted(fields)}.")
    model = ModelIdentity.from_json(data["model"]) if data.get("model") is not None else None
    try:
        return POLICIES[method](num_layers=data.get("num_layers"), model=model,
                                provenance=dict(data.get("provenance") or {}), **settings)
    except TypeError as exc:
        raise PlanError(f"policy settings are malformed: {exc}") from None


# -- the runtime --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PolicyStats:
    """Sublayer executions under a policy, per phase: how many token-MLPs (and attention contributions) ran."""

    mlp_total: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    mlp_run: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    attention_total: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    attention_run: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def mlp_skip_ratio(self, phase: str) -> float | None:
        total = self.mlp_total[phase]
        return None if total == 0 else 1 - self.mlp_run[phase] / total

    def skipped_mlps_per_token(self, phase: str) -> float | None:
        tokens = self.tokens[phase]
        return None if tokens == 0 else (self.mlp_total[phase] - self.mlp_run[phase]) / tokens

    def to_json(self) -> dict[str, Any]:
        out = {}
        for phase in PHASES:
            if self.tokens[phase]:
                out[phase] = {
                    "tokens": self.tokens[phase],
                    "mlp_skip_ratio": self.mlp_skip_ratio(phase),
                    "skipped_mlps_per_token": self.skipped_mlps_per_token(phase),
                    "attention_skip_ratio": (1 - self.attention_run[phase] / self.attention_total[phase]
                                             if self.attention_total[phase] else 0.0),
                }
        return out


@dataclasses.dataclass
class ActivationMap:
    """Which sublayers ran for which tokens in one forward (``record=True``): run masks ([batch, tokens] bools) of
    the skippable layers; every other layer ran for every token."""

    phase: str
    start: int
    batch: int
    tokens: int
    mlp: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    attention: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def grid(self, part: str, num_layers: int) -> torch.Tensor:
        """[layers, batch, tokens] bools: True where ``part`` ran."""
        grid = torch.ones(num_layers, self.batch, self.tokens, dtype=torch.bool)
        for layer, mask in getattr(self, part).items():
            grid[layer] = mask
        return grid


class PolicyHandle(Installed):
    """A policy applied to a model: the swapped MLP (and attention) forwards of the skippable layers and the hooks
    that feed the policy what it observes. Use as a context manager, or call :meth:`remove`."""

    def __init__(self, model: nn.Module, policy: HaltingPolicy, *, dry_run: bool = False, record: bool = False):
        super().__init__(model)
        self.policy, self.dry_run, self.record = policy, dry_run, record
        self.stats = PolicyStats()
        self.maps: list[ActivationMap] = []
        self.phase = "prefill"
        self._tokens = (1, 1)
        self._mlp_input: torch.Tensor | None = None
        self._masks: dict[tuple[int, str], torch.Tensor | bool | None] = {}
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    def _install(self) -> None:
        # Everything here runs for every token, so it is cheap: forwards are swapped (a Python call) rather than hooked
        # (a module hook costs ~12 us a call on CPU), and only the layers that need it are touched: observers up to
        # `last_check`, run masks on the skippable layers.
        adapter = get_adapter(self.model)
        layers = adapter.decoder_layers(self.model)
        skippable, observed = self.policy.skippable, self.policy.observed
        self.hook(decoder_stack(self.model).register_forward_pre_hook(self._begin, with_kwargs=True))  # per forward
        for index, layer in enumerate(layers):
            mlp, mlp_norms = adapter.branch_modules(layer, "mlp")
            mlp_input = _get_path(layer, adapter.mlp_input)
            observes = index in observed
            remember = observes and self.policy.observes_mlp_input
            skip = index in skippable
            if observes:
                self.swap(layer, self._observed_layer_forward(layer.forward, index))
            if skip:
                # the branch's norms too: a token that skips the MLP skips them (as a static skip does)
                for norm in mlp_norms:
                    self.swap(norm, self._mlp_norm_forward(norm.forward, index, remember=remember and norm is mlp_input))
                self.swap(mlp, self._mlp_forward(mlp.forward, index, remember=remember and mlp is mlp_input))
                if self.policy.skips_attention:
                    attention, _ = adapter.branch_modules(layer, "attention")
                    self.swap(attention, self._attention_forward(attention.forward, index))
            if remember and not (skip and any(mlp_input is m for m in (mlp, *mlp_norms))):
                self.swap(mlp_input, self._remembering_forward(mlp_input.forward))

    # -- what runs during a forward
    def _begin(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        source = ids if isinstance(ids, torch.Tensor) else kwargs["inputs_embeds"]
        batch, tokens = source.shape[:2]
        cache = cache_from(kwargs)
        start = cache.get_seq_length() if cache is not None else 0
        self.phase = phase = "decode" if start > 0 else "prefill"
        self._tokens = (batch, tokens)
        self._masks = {}
        # every sublayer is counted as run now; _decide uncounts the token-sublayers a mask skips (cheaper per layer)
        stats, count = self.stats, batch * tokens * self.policy.num_layers
        stats.tokens[phase] += batch * tokens
        stats.mlp_total[phase] += count
        stats.mlp_run[phase] += count
        stats.attention_total[phase] += count
        stats.attention_run[phase] += count
        self.policy.begin(phase, batch, tokens, start, source.device)
        if self.record:
            self.maps.append(ActivationMap(phase, start, batch, tokens))

    def _observed_layer_forward(self, original: Callable, index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            output = original(hidden_states, *args, **kwargs)
            self.policy.observe(index, hidden_states, self._mlp_input,
                                output[0] if isinstance(output, tuple) else output)
            return output
        return forward

    def _mlp_norm_forward(self, original: Callable, index: int, *, remember: bool) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if remember:
                self._mlp_input = hidden_states
            if self._mask(index, "mlp") is False:  # no token runs this MLP: its norm is an identity, like the MLP's zero
                return hidden_states
            return original(hidden_states, *args, **kwargs)
        return forward

    def _remembering_forward(self, original: Callable) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            self._mlp_input = hidden_states
            return original(hidden_states, *args, **kwargs)
        return forward

    def _mask(self, index: int, part: str) -> torch.Tensor | bool | None:
        """The run mask of one skippable sublayer in this forward, decided once (norms and core ask alike)."""
        key = (index, part)
        if key not in self._masks:
            self._masks[key] = self._decide(index, part)
        return self._masks[key]

    def _decide(self, index: int, part: str) -> torch.Tensor | None:
        """The run mask of one skippable sublayer, counted; None: every token runs (also in a dry run)."""
        mask = self.policy.run_mask(index, part)
        if mask is not None:
            batch, tokens = self._tokens
            run = self.stats.mlp_run if part == "mlp" else self.stats.attention_run
            run[self.phase] -= batch * tokens - (0 if mask is False else int(mask.sum()))
        if self.record:
            batch, tokens = self._tokens
            getattr(self.maps[-1], part)[index] = (torch.full((batch, tokens), mask is None) if not torch.is_tensor(mask)
                                                   else mask.cpu())
        return None if self.dry_run else mask

    def _mlp_forward(self, original: Callable, index: int, *, remember: bool) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if remember:  # this family's MLP reads the residual stream itself
                self._mlp_input = hidden_states
            mask = self._mask(index, "mlp")
            if mask is None:
                return original(hidden_states, *args, **kwargs)
            if mask is False:  # no token runs it (batch-1 decode: the token halted)
                return torch.zeros_like(hidden_states)
            output = torch.zeros_like(hidden_states)
            if bool(mask.any()):
                # the MLP is position-wise: run it on the rows that need it, as one [1, rows, hidden] batch
                output[mask] = original(hidden_states[mask].unsqueeze(0), *args, **kwargs).squeeze(0).to(output.dtype)
            return output
        return forward

    def _attention_forward(self, original: Callable, index: int) -> Callable:
        def forward(*args, **kwargs):
            outputs = original(*args, **kwargs)  # always runs: the cache gets every token's keys and values
            mask = self._mask(index, "attention")
            if mask is None:
                return outputs
            kept = torch.zeros_like(outputs[0]) if mask is False else outputs[0] * mask.unsqueeze(-1).to(outputs[0].dtype)
            return (kept,) + tuple(outputs[1:])
        return forward


def apply_policy(model: nn.Module, policy: HaltingPolicy, *, check_model: bool = True, dry_run: bool = False,
                 record: bool = False) -> PolicyHandle:
    """Apply ``policy`` until the returned handle is removed. ``dry_run``: decide but skip nothing (to measure the
    decision overhead); ``record``: keep an :class:`ActivationMap` per forward in ``handle.maps``."""
    if not isinstance(policy, HaltingPolicy):
        raise PlanError(f"apply_policy() needs a policy, got {type(policy).__name__}.")
    return policy.install(model, check_model=check_model, dry_run=dry_run, record=record)


# -- calibration --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def measure_skip_ratio(model: nn.Module, policy: HaltingPolicy, batches: Sequence[torch.Tensor]) -> float:
    """Share of token-MLPs ``policy`` skips on ``batches`` (teacher-forced forwards without a cache, i.e. prefill)."""
    with apply_policy(model, policy, check_model=False) as handle:
        for batch in batches:
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    return handle.stats.mlp_skip_ratio("prefill") or 0.0


def max_skip_ratio(num_layers: int, protect_first: int, protect_last: int) -> float:
    return (num_layers - protect_first - protect_last) / num_layers


# One per-layer check (the signal, a cosine or norms) against one MLP sublayer, at batch-1 decode on the 2-core CPU
# of FACTS.md: ~45 us between the model's large matrix products (its caches are cold) against ~0.8 ms.
CHECK_COST_IN_MLPS = 0.05


def calibrate(model: nn.Module, method: str, batches: Sequence[torch.Tensor], ratio: float, *, steps: int = 14,
              prefill: str = "same", last_check: int | str | None = "auto", check_cost: float = CHECK_COST_IN_MLPS,
              progress: Callable[[int, int], None] | None = None, **settings: Any) -> HaltingPolicy:
    """A ``method`` policy whose threshold skips ``ratio`` of all token-MLPs on the calibration batches (bisection
    on the threshold; the ratio is monotone in it). ``prefill``: "same" or "full" (prefill runs every layer).

    ``last_check``: the last layer whose signal may halt a token (None: every layer that can). "auto" picks it from
    the calibration text: the horizon that maximises the MLPs saved minus the cost of the checks, each check costing
    ``check_cost`` MLPs (a token that never halts pays a check at every observed layer, and halts late in the stack
    save little), then calibrates the threshold again with it.
    """
    num_layers = count_layers(model)
    probe = make_policy(method, num_layers, 0.0, **settings)
    ceiling = max_skip_ratio(num_layers, probe.protect_first, probe.protect_last)
    if not 0 < ratio < ceiling:
        raise PlanError(
            f"{method}: a skip ratio of {ratio:g} is out of reach: with protect_first={probe.protect_first} and "
            f"protect_last={probe.protect_last}, at most {ceiling:.2f} of the MLPs of a {num_layers}-layer model can be "
            "skipped. Ask for less, or protect fewer layers."
        )
    if prefill not in ("same", "full"):
        raise PlanError(f"prefill must be 'same' or 'full', got {prefill!r}.")
    auto = last_check == "auto"
    if isinstance(last_check, str) and not auto:
        raise PlanError(f"last_check must be a layer index, None or 'auto', got {last_check!r}.")
    total = 2 * steps if auto else steps
    report = (lambda done: progress(done, total)) if progress else (lambda done: None)
    settings = {**settings, "last_check": None if auto else last_check}
    threshold, measured = _bisect(model, num_layers, method, batches, ratio, steps, settings, report)
    if auto:
        chosen = best_last_check(model, make_policy(method, num_layers, threshold, **settings), batches, check_cost)
        if chosen != probe.last_check:  # the probe has the default: every layer that can decide
            settings["last_check"] = chosen
            threshold, measured = _bisect(model, num_layers, method, batches, ratio, steps, settings,
                                          lambda done: report(steps + done))
        report(total)
    policy = make_policy(method, num_layers, threshold, prefill_threshold="same" if prefill == "same" else None,
                         **settings)
    tokens = sum(int(b.numel()) for b in batches)
    policy.provenance = {"method": method, "target_skip_ratio": ratio, "calibrated_skip_ratio": measured,
                         "calibration_tokens": tokens}
    if auto:
        policy.provenance.update(last_check="auto", check_cost_in_mlps=check_cost)
    return policy.for_model(model)


def _bisect(model, num_layers, method, batches, ratio, steps, settings, report) -> tuple[float, float]:
    """(threshold, measured ratio) of the bisection step closest to ``ratio``."""
    low, high = _THRESHOLD_RANGE[method]
    more_with_larger = _MORE_SKIPS_WITH_LARGER[method]
    best: tuple[float, float] | None = None
    for step in range(steps):
        middle = (low + high) / 2
        measured = measure_skip_ratio(model, make_policy(method, num_layers, middle, **settings), batches)
        if best is None or abs(measured - ratio) < abs(best[1] - ratio):
            best = (middle, measured)
        if (measured < ratio) == more_with_larger:
            low = middle
        else:
            high = middle
        report(step + 1)
    return best


@torch.no_grad()
def best_last_check(model: nn.Module, policy: HaltingPolicy, batches: Sequence[torch.Tensor],
                    check_cost: float = CHECK_COST_IN_MLPS) -> int:
    """The ``last_check`` that maximises, over the calibration tokens, MLPs saved minus ``check_cost`` x checks,
    from where ``policy`` (checking every layer it can) halts each token. A token that halts at layer k was checked
    at the observed layers before k and saves the MLPs from k on; with a horizon before k-1 it would not halt, and
    would be checked at every observed layer up to the horizon."""
    with apply_policy(model, policy, check_model=False, record=True) as handle:
        for batch in batches:
            model(batch)
    halts = torch.cat([_first_skipped_layer(m.grid("mlp", policy.num_layers)) for m in handle.maps])
    first, stop = policy.observed.start, policy.skippable.stop
    halted = halts < policy.num_layers
    best: tuple[float, int] | None = None
    for horizon in range(policy.protect_first - 1, stop - 1):
        kept = halted & (halts - 1 <= horizon)
        saved = float((stop - halts[kept]).sum())
        checks = float((halts[kept] - first).sum()) + float((~kept).sum()) * (horizon - first + 1)
        net = saved - check_cost * checks
        if best is None or net > best[0]:
            best = (net, horizon)
    return best[1]


def _first_skipped_layer(grid: torch.Tensor) -> torch.Tensor:
    """Per token of a [layers, batch, tokens] run grid: the first layer whose MLP it skipped (layers if none)."""
    skipped = (~grid).flatten(1)
    return torch.where(skipped.any(0), skipped.int().argmax(0), grid.shape[0])


def skip_ratio_for_speedup(latency, num_layers: int, speedup: float) -> float:
    """The share of token-MLPs to skip for a decode ``speedup`` by a measured :class:`~skiplm.measure.latency.LatencyModel`
    (each skipped MLP saves ``latency.mlp_s``)."""
    if not speedup > 1:
        raise PlanError(f"target speedup must be greater than 1, got {speedup}.")
    if latency.mlp_s <= 0:
        raise PlanError("the latency model measured no saving from skipping MLPs on this device.")
    return (1 - 1 / speedup) * latency.full_s / (num_layers * latency.mlp_s)


# -- activation maps ----------------------------------------------------------------------------------------------------
def activation_summary(maps: Sequence[ActivationMap], num_layers: int) -> dict[str, Any]:
    """Per phase: share of tokens whose MLP ran at each layer (JSON-ready)."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        chosen = [m for m in maps if m.phase == phase]
        if not chosen:
            continue
        mlp = torch.cat([m.grid("mlp", num_layers).flatten(1) for m in chosen], dim=1).float()  # [layers, tokens]
        attention = torch.cat([m.grid("attention", num_layers).flatten(1) for m in chosen], dim=1).float()
        out[phase] = {"tokens": mlp.shape[1], "mlp_active_by_layer": mlp.mean(1).tolist(),
                      "attention_active_by_layer": attention.mean(1).tolist()}
    return out


def plot_activation_maps(maps: Sequence[ActivationMap], num_layers: int, path: str | Path, title: str) -> Path:
    """A token x layer picture of which MLPs ran: prefill (first row of the batch) and decode steps side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    prefill = [m for m in maps if m.phase == "prefill"]
    if prefill:
        panels.append(("prompt processing (prefill)", prefill[0].grid("mlp", num_layers)[:, 0, :].float()))
    decode = [m for m in maps if m.phase == "decode"]
    if decode:
        grids = [m.grid("mlp", num_layers)[:, 0, :] for m in decode]
        panels.append(("response generation (decode)", torch.cat(grids, dim=1).float()))
    if not panels:
        raise PlanError("no activation maps were recorded: run a forward pass with record=True first.")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (name, grid) in zip(axes[0], panels):
        axis.imshow(grid.numpy(), aspect="auto", cmap="Greys_r", vmin=0, vmax=1, origin="lower", interpolation="nearest")
        axis.set_title(f"{name}: {grid.mean():.0%} of MLPs active")
        axis.set_xlabel("token")
        axis.set_ylabel("layer")
    fig.suptitle(f"{title} (white: MLP ran; black: skipped)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SKIPPER_FILES.add(Spec(name=FORMAT_NAME, target=policy_from_json, kind=SKIPPER_FILES.kind,
                       summary="an input-adaptive policy (`skiplm policy`)"))
