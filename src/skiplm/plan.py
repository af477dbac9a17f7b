"""SkipPlan: which attention / MLP sublayers to skip, per phase, for one specific model.

A plan is frozen and validated on construction. On disk it is a small JSON file with a schema version, the identity of
the model it was made for (family, number of layers, a fingerprint of the weights) and its provenance (method,
target, data). Loading a plan onto another model is an error, never a silent mis-application.

Phases: ``prefill`` is a forward pass over a prompt with an empty cache (and every forward without a cache, e.g.
perplexity); ``decode`` is every forward that extends a non-empty cache. Most plans skip the same sublayers in both.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.adapters import PARTS, get_adapter, model_type_of
from ._version import __version__
from .errors import PlanError, PlanMismatchError
from .files import write_text_atomic
from .registry import SKIPPER_FILES, Spec
from .runtime.static import SkipHandle, install_plan

SCHEMA_VERSION = 1
FORMAT_NAME = "skiplm.plan"
PHASES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class SkipSet:
    """The sublayers one phase skips: layer indices whose attention / MLP branch does not run."""

    attention: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    def __post_init__(self):
        for part in PARTS:
            indices = getattr(self, part)
            if isinstance(indices, (str, bytes)) or not all(_is_index(i) for i in indices):
                raise PlanError(f"{part} skips must be layer indices (integers), got {sorted(map(repr, indices))}.")
            object.__setattr__(self, part, frozenset(int(i) for i in indices))

    @classmethod
    def of(cls, blocks: Iterable[int] = (), attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> SkipSet:
        blocks, attention, mlp = _index_list(blocks, "blocks"), _index_list(attention, "attention"), _index_list(mlp, "mlp")
        return cls(frozenset(blocks + attention), frozenset(blocks + mlp))

    @property
    def blocks(self) -> list[int]:
        """Layers skipped whole (both branches)."""
        return sorted(self.attention & self.mlp)

    def skips(self, layer: int, part: str) -> bool:
        return layer in (self.attention if part == "attention" else self.mlp)

    def is_empty(self) -> bool:
        return not self.attention and not self.mlp

    def touched_layers(self) -> frozenset[int]:
        return self.attention | self.mlp

    def half_blocks(self) -> dict[str, list[int]]:
        """The layers whose attention only or MLP only is skipped (not the whole block), per part."""
        blocks = set(self.blocks)
        return {"attention": sorted(self.attention - blocks), "mlp": sorted(self.mlp - blocks)}

    def to_json(self) -> dict[str, list[int]]:
        blocks = set(self.blocks)
        return {
            "blocks": sorted(blocks),
            "attention": sorted(self.attention - blocks),
            "mlp": sorted(self.mlp - blocks),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> SkipSet:
        if not isinstance(data, Mapping):
            raise PlanError(f"{where} must be an object with 'blocks', 'attention' and 'mlp' lists, got {data!r}.")
        unknown = set(data) - {"blocks", "attention", "mlp"}
        if unknown:
            raise PlanError(f"{where} has unknown keys {sorted(unknown)}; allowed: blocks, attention, mlp.")
        lists = {}
        for key in ("blocks", "attention", "mlp"):
            value = data.get(key, [])
            if not isinstance(value, list):
                raise PlanError(f"{where}.{key} must be a list of layer indices (integers), got {value!r}.")
            lists[key] = _index_list(value, f"{where}.{key}")
        return cls.of(**lists)

    def describe(self, num_layers: int) -> str:
        if self.is_empty():
            return "nothing skipped"
        parts = []
        if self.blocks:
            parts.append(f"blocks {_ranges(self.blocks)}")
        only_attention = sorted(self.attention - set(self.blocks))
        only_mlp = sorted(self.mlp - set(self.blocks))
        if only_attention:
            parts.append(f"attention {_ranges(only_attention)}")
        if only_mlp:
            parts.append(f"mlp {_ranges(only_mlp)}")
        return f"skip {'; '.join(parts)} of {num_layers} layers"


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What a plan records about the model it was made for."""

    model_type: str
    num_layers: int
    fingerprint: str  # hash of parameter names and shapes
    weight_samples: tuple[float, ...]  # a few weight values; dtype-tolerant check that the weights are the same
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "fingerprint": self.fingerprint,
            "weight_samples": list(self.weight_samples),
            "name": self.name,
        }

    @classmethod
    def from_json(cls, data: Any) -> ModelIdentity:
        try:
            return cls(
                model_type=str(data["model_type"]),
                num_layers=int(data["num_layers"]),
                fingerprint=str(data["fingerprint"]),
                weight_samples=tuple(float(x) for x in data["weight_samples"]),
                name=data.get("name"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan field 'model' is malformed ({exc!r}); re-create the plan with `skiplm plan`.") from None


_SAMPLES_PER_TENSOR = 8


def model_identity(model: nn.Module, name: str | None = None) -> ModelIdentity:
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    shapes = hashlib.sha256()
    for param_name, param in model.named_parameters():
        shapes.update(f"{param_name}:{tuple(param.shape)};".encode())
    probes = [model.get_input_embeddings().weight]
    for layer in (layers[0], layers[len(layers) - 1]):
        for part in PARTS:
            core, _ = adapter.branch_modules(layer, part)
            probes.append(next(core.parameters()))
    samples = []
    for tensor in probes:
        flat = tensor.detach().reshape(-1)
        index = (torch.arange(_SAMPLES_PER_TENSOR) * (flat.numel() - 1) // (_SAMPLES_PER_TENSOR - 1)).to(flat.device)
        samples.extend(float(f"{v:.6g}") for v in flat[index].float().cpu().tolist())
    return ModelIdentity(
        model_type=model_type_of(model),
        num_layers=len(layers),
        fingerprint=shapes.hexdigest()[:16],
        weight_samples=tuple(samples),
        name=name or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )


@dataclasses.dataclass(frozen=True, eq=True)
class SkipPlan:
    """What to skip, per phase, for one model. Build with :meth:`from_layers` or a planner; save with :meth:`save`."""

    num_layers: int
    prefill: SkipSet
    decode: SkipSet
    model: ModelIdentity | None = None
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    input_adaptive = False  # the skipper protocol: what it skips is fixed (prefill, decode), whatever the input

    def __post_init__(self):
        object.__setattr__(self, "provenance", dict(self.provenance))
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise PlanError(f"num_layers must be a positive integer, got {self.num_layers!r}.")
        if self.model is not None and self.model.num_layers != self.num_layers:
            raise PlanError(
                f"plan covers {self.num_layers} layers but names a model with {self.model.num_layers}; the file is inconsistent."
            )
        for phase in PHASES:
            skips: SkipSet = getattr(self, phase)
            for part in PARTS:
                bad = sorted(i for i in getattr(skips, part) if not 0 <= i < self.num_layers)
                if bad:
                    raise PlanError(
                        f"{phase} plan skips {part} of layer(s) {bad}, out of range for a {self.num_layers}-layer model "
                        f"(valid indices 0..{self.num_layers - 1})."
                    )
            if len(skips.blocks) == self.num_layers:
                raise PlanError(
                    f"{phase} plan skips every one of the {self.num_layers} layers: the model would compute nothing. "
                    "Keep at least one layer."
                )
        holes = sorted(self.prefill.attention - self.decode.attention)
        if holes:
            raise PlanError(
                f"prefill skips attention of layer(s) {holes} but decode runs it: decode would attend over prompt "
                "positions that have no keys/values in the cache. Skip those attention sublayers in decode too, or "
                "run them in prefill."
            )

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_layers(
        cls,
        num_layers: int,
        blocks: Iterable[int] = (),
        attention: Iterable[int] = (),
        mlp: Iterable[int] = (),
        *,
        prefill: str | SkipSet = "same",
        model: ModelIdentity | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> SkipPlan:
        """A plan skipping ``blocks`` whole and the given attention / MLP sublayers in decode.

        ``prefill``: ``"same"`` (skip the same in prefill), ``"full"`` (prefill at full depth, as Unified Layer
        Skipping does), or an explicit :class:`SkipSet`.
        """
        decode = SkipSet.of(blocks, attention, mlp)
        if prefill == "same":
            prefill_set = decode
        elif prefill == "full":
            prefill_set = SkipSet()
        elif isinstance(prefill, SkipSet):
            prefill_set = prefill
        else:
            raise PlanError(f"prefill must be 'same', 'full' or a SkipSet, got {prefill!r}.")
        return cls(num_layers, prefill_set, decode, model, provenance or {})

    @classmethod
    def empty(cls, num_layers: int, model: ModelIdentity | None = None) -> SkipPlan:
        return cls(num_layers, SkipSet(), SkipSet(), model, {"method": "none"})

    def for_model(self, model: nn.Module, name: str | None = None) -> SkipPlan:
        """The same plan, stamped with ``model``'s identity (checked against the plan's layer count)."""
        identity = model_identity(model, name)
        if identity.num_layers != self.num_layers:
            raise PlanMismatchError(
                f"this plan covers {self.num_layers} layers but the model has {identity.num_layers}."
            )
        return dataclasses.replace(self, model=identity)

    # -- queries -------------------------------------------------------------------------------------------------
    def phase(self, name: str) -> SkipSet:
        return self.prefill if name == "prefill" else self.decode

    def is_empty(self) -> bool:
        return self.prefill.is_empty() and self.decode.is_empty()

    def teacher_forced(self) -> SkipPlan:
        """The plan for scoring text in one forward (perplexity): every token is treated as decode treats it."""
        return dataclasses.replace(self, prefill=self.decode)

    def describe(self) -> str:
        decode = self.decode.describe(self.num_layers)
        if self.prefill == self.decode:
            return decode
        return f"decode: {decode}; prefill: {self.prefill.describe(self.num_layers)}"

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`PlanMismatchError` unless this plan was made for ``model`` (a different dtype is fine)."""
        check_made_for(model, self.num_layers, self.model, what="plan", remedy="Make a plan for this model with `skiplm plan`")

    def install(self, model: nn.Module, *, check_model: bool = True) -> SkipHandle:
        """Apply this plan to ``model`` (the skipper protocol; :func:`skiplm.apply` calls this)."""
        return install_plan(model, self, check_model=check_model)

    # -- files ---------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "num_layers": self.num_layers,
            "description": self.describe(),
            "prefill": self.prefill.to_json(),
            "decode": self.decode.to_json(),
            "model": self.model.to_json() if self.model else None,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2)
        # keep lists of numbers on one line: a plan should read at a glance
        text = re.sub(r"\[\s*([-0-9.,\se]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        return write_text_atomic(path, text + "\n")  # whole or not at all

    @classmethod
    def from_json(cls, data: Any) -> SkipPlan:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
            raise PlanError(f"not a skiplm plan: expected an object with \"format\": \"{FORMAT_NAME}\".")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise PlanError("plan has no integer 'schema_version'.")
        if version > SCHEMA_VERSION:
            raise PlanError(
                f"plan schema version {version} is newer than this skiplm understands ({SCHEMA_VERSION}): upgrade skiplm."
            )
        num_layers = data.get("num_layers")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool):
            raise PlanError(f"plan field 'num_layers' must be an integer, got {num_layers!r}.")
        for phase in PHASES:
            if phase not in data:
                raise PlanError(f"plan has no '{phase}' section; the file may be truncated or hand-edited.")
        model = ModelIdentity.from_json(data["model"]) if data.get("model") is not None else None
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, Mapping):
            raise PlanError("plan field 'provenance' must be an object.")
        return cls(
            num_layers=num_layers,
            prefill=SkipSet.from_json(data["prefill"], "prefill"),
            decode=SkipSet.from_json(data["decode"], "decode"),
            model=model,
            provenance=provenance,
        )

    @classmethod
    def load(cls, path: str | Path) -> SkipPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PlanError(f"plan file {path} is not text (not UTF-8); a plan is a JSON file made by `skiplm plan`.") from None
        if not text.strip():
            raise PlanError(f"plan file {path} is empty; re-create it with `skiplm plan`.")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"plan file {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); it may be "
                "truncated. Re-create it with `skiplm plan`."
            ) from None
        try:
            return cls.from_json(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None


def check_made_for(model: nn.Module, num_layers: int, expected: ModelIdentity | None, *, what: str, remedy: str) -> None:
    """Raise :class:`PlanMismatchError` unless a ``what`` (plan, policy) covering ``num_layers`` layers and made for
    the model ``expected`` fits ``model``; ``remedy`` says how to make one that does."""
    identity = model_identity(model)
    if identity.num_layers != num_layers:
        raise PlanMismatchError(
            f"this {what} covers {num_layers} layers but the model has {identity.num_layers}: it was made for "
            f"another model{_named(expected)}. {remedy}."
        )
    if expected is None:
        return
    if identity.model_type != expected.model_type or identity.fingerprint != expected.fingerprint:
        raise PlanMismatchError(
            f"this {what} was made for a different model{_named(expected)} ({expected.model_type}, parameter "
            f"fingerprint {expected.fingerprint}); this model is {identity.model_type}, fingerprint "
            f"{identity.fingerprint}. {remedy}."
        )
    if not _close(identity.weight_samples, expected.weight_samples):
        raise PlanMismatchError(
            f"this {what} was made for a model with the same shapes but different weights{_named(expected)} (a "
            f"fine-tune or another checkpoint). Which layers matter depends on the weights: {remedy[0].lower()}{remedy[1:]}, "
            "or pass check_model=False / --force if you are sure."
        )


def provenance(method: str, **fields: Any) -> dict[str, Any]:
    return {
        "method": method,
        **fields,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "skiplm_version": __version__,
    }


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _index_list(values: Iterable[Any], where: str) -> list[int]:
    if isinstance(values, (str, bytes)):
        raise PlanError(f"{where} must be a list of layer indices (integers), got {values!r}.")
    values = list(values)
    if not all(_is_index(v) for v in values):
        raise PlanError(f"{where} must be a list of layer indices (integers), got {values!r}.")
    return values


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    # bf16 keeps ~3 significant digits; any other checkpoint differs far more than this.
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=2e-2, abs_tol=2e-3) for x, y in zip(a, b))


def _named(identity: ModelIdentity | None) -> str:
    return f" ({identity.name})" if identity is not None and identity.name else ""


def _ranges(indices: list[int]) -> str:
    return ",".join(str(i) for i in indices)


SKIPPER_FILES.add(Spec(name=FORMAT_NAME, target=SkipPlan.from_json, kind=SKIPPER_FILES.kind,
                       summary="a static skip plan (`skiplm plan`)", extra={"load": SkipPlan.load}))
