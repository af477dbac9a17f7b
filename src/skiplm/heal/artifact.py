"""The healed-model artifact: a skip plan plus what heals it, as one folder, and how it goes onto a model.

A heal folder holds ``heal.json`` and the weights of each healing step::

    heal.json           {"format": "skiplm.heal", "schema_version": 1, "method": "bridge",
                         "plan": {...the skiplm.plan, with the model identity...},
                         "steps": [{"method": "bridge", "file": "bridge.safetensors", "sha256": ..., "bytes": ...,
                                    "spans": [{"blocks": [8, 9], "fold": "mlp-down", "parameter": ..., "tensor":
                                               "span.8-9", "residual_before": 0.41, "residual_after": 0.12}]}],
                         "provenance": {"calibration": {...}, "seconds": ..., "options": {...}, ...}}
    bridge.safetensors  one float32 [d, d] map ``T`` per span (see :mod:`skiplm.heal.spans` for where it folds)

Steps run in order; the later healing methods (a peft adapter folder, partially trained layers) are further steps
with their own files. A reader refuses a step method it does not know (a newer skiplm wrote it).

:class:`Healed` is a skipper (:mod:`skiplm.skipper`): ``skiplm.apply(model, healed)`` bakes the folded weights in
(``W' = T^T W`` for a down projection, ``E' = E T`` for the embedding) and applies the plan; the handle's
``remove()`` copies the original weights back bit for bit and removes the plan. ``handle.disabled()`` runs the full
model inside its block: plan off *and* original weights back (the full model is the teacher, never the healed one).
``merge=True`` (or :meth:`Healed.merge`) bakes the weights in for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..files import atomic_folder, check_output, write_bytes_atomic, write_text_atomic
from ..plan import SkipPlan
from ..runtime import SkipHandle, check_free, check_layers, install_handle
from .spans import HealError, Span, resolve_spans

FORMAT_NAME = "skiplm.heal"
SCHEMA_VERSION = 1
HEAL_FILE = "heal.json"
BRIDGE_FILE = "bridge.safetensors"
KNOWN_STEPS = ("bridge",)
_MERGED_ATTRIBUTE = "_skiplm_merged_heal"  # on a model: the bridge file hashes merged into its weights for good


def folded_weights(model: nn.Module, spans: list[Span], maps: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, its healed value) for every weight the spans' maps fold into, in the parameter's dtype."""
    parameters = dict(model.named_parameters())
    out = []
    for span in spans:
        t = maps[span.name].to(torch.float64)  # [d, d]
        weight = parameters[span.parameter]
        t = t.to(weight.device)
        if span.fold == "mlp-down":  # weight [d, d_ff]: (z W^T + b) T = z (T^T W)^T + b T
            out.append((weight, (t.T @ weight.detach().to(torch.float64)).to(weight.dtype)))
            bias = parameters.get(span.parameter.rsplit(".", 1)[0] + ".bias")
            if bias is not None:
                out.append((bias, (bias.detach().to(torch.float64) @ t).to(bias.dtype)))
        else:  # embedding weight [V, d]: row e -> e T
            out.append((weight, (weight.detach().to(torch.float64) @ t).to(weight.dtype)))
    return out


class _WeightSwap:
    """Healed values copied into parameters in place, and the originals kept to copy back exactly."""

    def __init__(self, pairs: list[tuple[nn.Parameter, torch.Tensor]]):
        self.pairs = pairs
        self.originals = [param.detach().clone() for param, _ in pairs]
        self.baked = False

    @torch.no_grad()
    def bake(self) -> None:
        for param, healed in self.pairs:
            param.copy_(healed)
        self.baked = True

    @torch.no_grad()
    def restore(self) -> None:
        for (param, _), original in zip(self.pairs, self.originals):
            param.copy_(original)
        self.baked = False


class HealHandle(SkipHandle):
    """A healed plan on a model: the bridge baked into the weights (reversibly unless merged) and the plan applied."""

    def __init__(self, model: nn.Module, plan: SkipPlan, swap: _WeightSwap | None):
        self.swap_weights = swap  # None: merged for good, nothing to restore
        super().__init__(model, plan)

    def _install(self) -> None:
        if self.swap_weights is not None:
            self.swap_weights.bake()
            self._restore.append(self.swap_weights.restore)  # undone last (remove() pops in reverse)
        super()._install()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The full model inside this block: the plan off and the original weights back (restored bit for bit)."""
        swap = self.swap_weights
        if swap is None:
            raise HealError("this healed model was merged into the weights for good: the full model is gone from it. "
                            "Apply without merge=True to keep the full model available.")
        with super().disabled():
            swap.restore()
            try:
                yield
            finally:
                swap.bake()


class Healed:
    """A plan and the bridge maps that heal it (:func:`load_healed` reads one; :func:`skiplm.heal.heal` makes one)."""

    input_adaptive = False

    def __init__(self, plan: SkipPlan, spans: list[Span], maps: dict[str, torch.Tensor], *, method: str = "bridge",
                 fit: list[dict[str, Any]] | None = None, provenance: dict[str, Any] | None = None):
        if plan.model is None:
            raise HealError("a healed plan must name the model it was made for; stamp it with plan.for_model(model).")
        self.plan = plan
        self.spans = list(spans)
        self.maps = {name: tensor.detach().to(torch.float32).cpu().contiguous() for name, tensor in maps.items()}
        self.method = method
        self.fit = list(fit or [{} for _ in self.spans])
        self.provenance = dict(provenance or {})
        missing = [s.name for s in self.spans if s.name not in self.maps]
        if missing:
            raise HealError(f"the bridge has no map for span(s) {missing}; the heal folder is incomplete. Heal again.")

    # -- the skipper protocol ----------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.plan.num_layers

    def check_model(self, model: nn.Module) -> None:
        from ..plan import check_made_for

        check_made_for(model, self.plan.num_layers, self.plan.model, what="heal folder",
                       remedy="Heal a plan made for this model with `skiplm heal`")

    def describe(self) -> str:
        return f"{self.plan.describe()}, healed ({self.method}, {len(self.spans)} span(s))"

    def teacher_forced(self) -> Healed:
        return self  # a block plan skips the same in prefill and decode

    def is_empty(self) -> bool:
        return False

    def install(self, model: nn.Module, *, check_model: bool = True, merge: bool = False) -> HealHandle:
        """Bake the bridge into ``model``'s weights and apply the plan. ``merge``: for good (the handle then removes
        only the plan); else ``remove()`` restores the original weights exactly."""
        def handle() -> HealHandle:
            swap = self._fold(model)
            if merge:
                swap.bake()
                self._mark_merged(model)
                swap = None
            return HealHandle(model, self.plan, swap)

        return install_handle(self, model, handle, check_model=check_model, what="heal folder")

    def merge(self, model: nn.Module, *, check_model: bool = True) -> None:
        """Bake the bridge into ``model``'s weights for good (no plan applied: apply ``self.plan`` to run it)."""
        check_free(model)
        check_layers(self, model, check_model, "heal folder")
        self._fold(model).bake()
        self._mark_merged(model)

    def _fold(self, model: nn.Module) -> _WeightSwap:
        """The model's weights with this bridge folded in (not yet swapped in); a bridge merged already is refused."""
        if self._digest() in getattr(model, _MERGED_ATTRIBUTE, ()):
            raise HealError("this bridge is already merged into the model's weights; applying it again would heal "
                            "twice. Apply its plan instead: skiplm.apply(model, healed.plan, check_model=False).")
        return _WeightSwap(folded_weights(model, resolve_spans(model, self.plan), self.maps))

    @contextlib.contextmanager
    def baked(self, model: nn.Module) -> Iterator[nn.Module]:
        """The bridge in ``model``'s weights inside the block (no plan applied), the originals back after it."""
        check_free(model)
        swap = _WeightSwap(folded_weights(model, resolve_spans(model, self.plan), self.maps))
        swap.bake()
        try:
            yield model
        finally:
            swap.restore()

    def _mark_merged(self, model: nn.Module) -> None:
        object.__setattr__(model, _MERGED_ATTRIBUTE, (*getattr(model, _MERGED_ATTRIBUTE, ()), self._digest()))

    def _digest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.maps):
            digest.update(name.encode() + self.maps[name].numpy().tobytes())
        return digest.hexdigest()

    # -- files -------------------------------------------------------------------------------------------------------
    def _bridge_bytes(self) -> bytes:
        from safetensors.torch import save

        return save(dict(sorted(self.maps.items())), metadata={"format": FORMAT_NAME, "method": "bridge"})

    def to_json(self, bridge: bytes | None = None) -> dict[str, Any]:
        bridge = self._bridge_bytes() if bridge is None else bridge
        spans = [{**span.to_json(), **fit} for span, fit in zip(self.spans, self.fit)]
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "description": self.describe(),
            "plan": self.plan.to_json(),
            "steps": [{"method": "bridge", "file": BRIDGE_FILE, "sha256": hashlib.sha256(bridge).hexdigest(),
                       "bytes": len(bridge), "spans": spans}],
            "provenance": self.provenance,
        }

    def save(self, folder: str | Path) -> Path:
        """Write the heal folder (``heal.json`` + ``bridge.safetensors``), whole or not at all; an earlier heal folder
        there is replaced once the new one is complete, any other non-empty folder refused."""
        folder = check_output(folder, kind="folder", what="heal folder")
        replace = (folder / HEAL_FILE).is_file()
        bridge = self._bridge_bytes()
        with atomic_folder(folder, replace=replace) as building:
            write_bytes_atomic(building / BRIDGE_FILE, bridge)
            write_text_atomic(building / HEAL_FILE, json.dumps(self.to_json(bridge), indent=2) + "\n")
        return folder


def load_healed(folder: str | Path) -> Healed:
    """The healed plan a folder written by ``skiplm heal`` (or :meth:`Healed.save`) holds, checked whole."""
    folder = Path(folder)
    if folder.is_file() and folder.name == HEAL_FILE:
        folder = folder.parent
    record = folder / HEAL_FILE
    if not folder.is_dir() or not record.is_file():
        raise HealError(f"{folder} is not a heal folder (no {HEAL_FILE} in it); make one with `skiplm heal`.")
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HealError(f"{record} is not valid JSON ({exc}); it may be truncated. Heal again with `skiplm heal`.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise HealError(f"{record} is not a skiplm heal record (expected \"format\": \"{FORMAT_NAME}\").")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise HealError(f"{record} has no integer 'schema_version'.")
    if version > SCHEMA_VERSION:
        raise HealError(f"{record} has schema version {version}, newer than this skiplm understands "
                        f"({SCHEMA_VERSION}): upgrade skiplm.")
    try:
        plan = SkipPlan.from_json(data["plan"])
        steps = list(data["steps"])
    except (KeyError, TypeError) as exc:
        raise HealError(f"{record} is malformed (missing {exc}); heal again with `skiplm heal`.") from None
    except PlanError as exc:
        raise HealError(f"{record}: its plan is invalid: {exc}") from None
    unknown = [step.get("method") for step in steps if not isinstance(step, dict) or step.get("method") not in KNOWN_STEPS]
    if unknown or len(steps) != 1:
        raise HealError(f"{record} has healing steps {unknown or [s.get('method') for s in steps]} this skiplm cannot "
                        f"apply (it knows one {', '.join(KNOWN_STEPS)} step): upgrade skiplm.")
    step = steps[0]
    maps = _read_bridge(folder, step)
    try:
        spans = [Span(int(s["blocks"][0]), int(s["blocks"][-1]), str(s["fold"]), str(s["parameter"])) for s in step["spans"]]
        fit = [{k: s[k] for k in ("residual_before", "residual_after") if k in s} for s in step["spans"]]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise HealError(f"{record}: malformed span record ({exc!r}); heal again with `skiplm heal`.") from None
    from .spans import check_block_plan

    if [(s.start, s.end) for s in spans] != check_block_plan(plan) or any(s.fold not in ("mlp-down", "embedding") for s in spans):
        raise HealError(f"{record}: its spans do not match its plan's skipped blocks; the file was edited. Heal again.")
    for span in spans:
        tensor = maps.get(span.name)
        if tensor is None or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
            raise HealError(f"{folder / BRIDGE_FILE} has no square map {span.name!r} for blocks {span.start}..{span.end}; "
                            "heal again.")
    return Healed(plan, spans, maps, method=str(data.get("method", "bridge")), fit=fit,
                  provenance=dict(data.get("provenance") or {}))


def _read_bridge(folder: Path, step: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    path = folder / str(step.get("file", BRIDGE_FILE))
    if not path.is_file():
        raise HealError(f"{path} is missing: the heal folder is incomplete. Heal again with `skiplm heal`.")
    data = path.read_bytes()
    if step.get("bytes") is not None and len(data) != step["bytes"]:
        raise HealError(f"{path} has {len(data)} bytes, {step['bytes']} were written: it is truncated or was changed. "
                        "Heal again with `skiplm heal`.")
    if step.get("sha256") is not None and hashlib.sha256(data).hexdigest() != step["sha256"]:
        raise HealError(f"{path} does not match the checksum in {HEAL_FILE}: it was changed or damaged. Heal again.")
    try:
        return dict(load(data))
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for damaged files)
        raise HealError(f"{path} is not a readable safetensors file ({exc}); heal again with `skiplm heal`.") from None


__all__ = [
    "BRIDGE_FILE",
    "FORMAT_NAME",
    "HEAL_FILE",
    "SCHEMA_VERSION",
    "HealHandle",
    "Healed",
    "folded_weights",
    "load_healed",
]
