"""The LoRA-Drop skipper (:class:`LoraDrop`) and its files.

A skipper of the one protocol (:mod:`skiplm.skipper`): ``skiplm.apply(model, lora_drop)`` installs it
(:class:`~skiplm.lora_drop.runtime.LoraDropHandle`; what a dropped step computes, writes to the KV cache and reads is
stated there), ``teacher_forced()`` is the view that scores text in one forward exactly as step-by-step decoding
would, ``handle.stats`` counts what was dropped.

Files. A LoRA-Drop skipper is a folder (``skiplm lora-drop -o DIR``)::

    DIR/lora-drop.json              {"format": "skiplm.lora-drop", "schema_version": 1, "anchor_every": K,
                                     "rank": r, "droppable": [1, 2, 3, 5, ...], "model": {...identity...},
                                     "files": {"corrections.safetensors": {"sha256": ..., "bytes": ...}},
                                     "provenance": {...training record...}}
    DIR/corrections.safetensors     per droppable layer i: "layers.i.down" A [r, d] and "layers.i.up" B [d, r]

``skiplm.load_skipper`` takes the folder or its ``lora-drop.json`` (so ``--plan DIR/lora-drop.json`` works wherever a
plan or policy file does). A skipper without trained corrections (zero: pure reuse) has no weights file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_folder, check_output, check_record, read_json, write_bytes_atomic, write_text_atomic
from ..plan import ModelIdentity, check_made_for, model_identity
from ..errors import PlanError
from ..runtime.hooks import install_handle
from .runtime import LoraDropError, LoraDropHandle

FORMAT_NAME = "skiplm.lora-drop"
SCHEMA_VERSION = 1
RECORD_FILE = "lora-drop.json"
WEIGHTS_FILE = "corrections.safetensors"
PAPER = "LoRA-Drop: temporal reuse of layer outputs with a low-rank correction (arXiv 2601.02569)"


def paper_droppable(num_layers: int) -> tuple[int, ...]:
    """The paper's droppable layers: index > 0 and index % 4 != 0 (of 30: 22 droppable, 0, 4, ..., 28 always run)."""
    return tuple(i for i in range(num_layers) if i > 0 and i % 4 != 0)


@dataclasses.dataclass
class LoraDrop:
    """Drop the ``droppable`` layers on all but every ``anchor_every``-th decode step, reusing the last anchor's
    residual update plus a rank-``rank`` correction (see :mod:`skiplm.lora_drop.runtime` for the exact rule).

    ``corrections``: per droppable layer, (A [rank, d], B [d, rank]) fp32 tensors; None: no correction (pure reuse).
    ``forced_prompt``: None for generation (the prefill runs in full); n for the one-forward view that treats the
    first n real positions as a prompt and every later one as decode would (:meth:`teacher_forced`: n = 1).
    """

    num_layers: int
    anchor_every: int
    rank: int = 8
    droppable: tuple[int, ...] | None = None  # None: the paper's rule
    corrections: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    model: ModelIdentity | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    forced_prompt: int | None = None

    input_adaptive = True  # what it drops depends on the token's place in the schedule: only a run counts it (stats)
    skips_attention = True  # a dropped layer skips its attention and its MLP
    method = "lora-drop"

    def __post_init__(self):
        for name, low in (("num_layers", 1), ("anchor_every", 1), ("rank", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LoraDropError(f"lora-drop: {name} must be a whole number >= {low}, got {value!r}.")
        if self.forced_prompt is not None and (isinstance(self.forced_prompt, bool)
                                               or not isinstance(self.forced_prompt, int) or self.forced_prompt < 1):
            raise LoraDropError(f"lora-drop: forced_prompt must be None or a whole number >= 1, got "
                                f"{self.forced_prompt!r}.")
        droppable = paper_droppable(self.num_layers) if self.droppable is None else self.droppable
        try:
            droppable = tuple(sorted({int(i) for i in droppable if not isinstance(i, bool)}))
        except (TypeError, ValueError):
            raise LoraDropError(f"lora-drop: droppable must be layer indices, got {self.droppable!r}.") from None
        if any(i < 1 or i >= self.num_layers for i in droppable):
            raise LoraDropError(f"lora-drop: droppable layers must be from 1 to {self.num_layers - 1} (layer 0 always "
                                f"runs: the cache's length is read from it), got {list(droppable)}.")
        self.droppable = droppable
        if self.corrections is not None:
            corrections = {}
            for index, pair in self.corrections.items():
                if index not in droppable:
                    raise LoraDropError(f"lora-drop: a correction for layer {index}, which is not droppable.")
                down, up = (torch.as_tensor(t).detach().to(torch.float32).cpu().contiguous() for t in pair)
                if (down.dim() != 2 or up.dim() != 2 or down.shape[0] != self.rank or up.shape[1] != self.rank
                        or up.shape[0] != down.shape[1]):
                    raise LoraDropError(f"lora-drop: the correction of layer {index} must be A [{self.rank}, d] and "
                                        f"B [d, {self.rank}], got {tuple(down.shape)} and {tuple(up.shape)}.")
                if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                    raise LoraDropError(f"lora-drop: the correction of layer {index} holds NaN or infinite values.")
                corrections[int(index)] = (down, up)
            self.corrections = corrections

    # -- building ----------------------------------------------------------------------------------------------------
    @classmethod
    def initial(cls, model: nn.Module, anchor_every: int, rank: int = 8, *, droppable=None, seed: int = 0,
                name: str | None = None) -> LoraDrop:
        """An untrained skipper for ``model`` with corrections to train: A drawn like a LoRA down projection
        (Kaiming-uniform, ``seed``), B zero — so it starts as pure reuse, exactly."""
        identity = model_identity(model, name)
        hidden = model.config.hidden_size
        skipper = cls(identity.num_layers, anchor_every, rank, droppable, model=identity)
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(hidden)
        skipper.corrections = {i: ((torch.rand(rank, hidden, generator=generator) * 2 - 1) * bound,
                                   torch.zeros(hidden, rank)) for i in skipper.droppable}
        return skipper

    def for_model(self, model: nn.Module, name: str | None = None) -> LoraDrop:
        identity = model_identity(model, name)
        if identity.num_layers != self.num_layers:
            raise LoraDropError(f"this LoRA-Drop skipper covers {self.num_layers} layers but the model has "
                                f"{identity.num_layers}.")
        return dataclasses.replace(self, model=identity)

    # -- the skipper protocol ----------------------------------------------------------------------------------------
    @property
    def skippable(self) -> tuple[int, ...]:
        """The layers it may drop (what reports call a policy's skippable layers)."""
        return self.droppable

    def install(self, model: nn.Module, *, check_model: bool = True, dry_run: bool = False) -> LoraDropHandle:
        """Apply to ``model`` (:func:`skiplm.apply` calls this). ``dry_run``: decide and count, drop nothing."""
        return install_handle(self, model, lambda: LoraDropHandle(model, self, dry_run=dry_run),
                              check_model=check_model, what="LoRA-Drop skipper")

    def check_model(self, model: nn.Module) -> None:
        check_made_for(model, self.num_layers, self.model, what="LoRA-Drop skipper",
                       remedy="Train one for this model with `skiplm lora-drop`")

    def describe(self) -> str:
        corrected = (f"rank-{self.rank} correction" if self.corrections else "no correction (pure reuse)")
        view = "" if self.forced_prompt is None else f", scored as decode after a {self.forced_prompt}-token prompt"
        return (f"lora-drop (anchor every {self.anchor_every} tokens; {len(self.droppable)} of {self.num_layers} "
                f"layers droppable: {_ranges(self.droppable)}; {corrected}{view})")

    def teacher_forced(self) -> LoraDrop:
        """The view for scoring text in one forward: the first token a prompt, every later one as decode treats it
        (anchors every ``anchor_every`` positions, the others reusing their anchor) — equal to step-by-step decoding."""
        return dataclasses.replace(self, forced_prompt=1)

    def is_empty(self) -> bool:
        return self.anchor_every == 1 or not self.droppable

    def kv_fraction(self, prompt: int, new_tokens: int) -> float:
        """The share of the full model's KV-cache entries this schedule keeps after a ``prompt``-token prefill and
        ``new_tokens`` decode steps (every layer the same size per entry)."""
        total = prompt + new_tokens
        anchors = new_tokens // self.anchor_every
        kept = (self.num_layers - len(self.droppable)) * total + len(self.droppable) * (prompt + anchors)
        return kept / (self.num_layers * total)

    # -- files -------------------------------------------------------------------------------------------------------
    def weights_bytes(self) -> bytes | None:
        from safetensors.torch import save

        if not self.corrections:
            return None
        tensors = {}
        for index, (down, up) in sorted(self.corrections.items()):
            tensors[f"layers.{index}.down"] = down.contiguous()
            tensors[f"layers.{index}.up"] = up.contiguous()
        return save(dict(sorted(tensors.items())), metadata={"format": "pt"})

    def to_json(self, weights: bytes | None = None) -> dict[str, Any]:
        weights = self.weights_bytes() if weights is None else weights
        files = ({} if weights is None else
                 {WEIGHTS_FILE: {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}})
        return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "method": self.method,
                "num_layers": self.num_layers, "description": self.describe(), "anchor_every": self.anchor_every,
                "rank": self.rank, "droppable": list(self.droppable), "forced_prompt": self.forced_prompt,
                "files": files, "model": self.model.to_json() if self.model else None, "provenance": self.provenance}

    def save(self, path: str | Path) -> Path:
        """Write the folder ``path`` (``lora-drop.json`` and the corrections), whole or not at all; an earlier
        LoRA-Drop folder there is replaced, any other non-empty folder refused. A path ending in ``.json`` is the
        record file of its folder (which must be ``lora-drop.json``)."""
        path = Path(path)
        if path.suffix == ".json":
            if path.name != RECORD_FILE:
                raise LoraDropError(f"a LoRA-Drop skipper is a folder; its record is named {RECORD_FILE}, not "
                                    f"{path.name}. Give the folder.")
            path = path.parent
        folder = check_output(path, kind="folder", what="LoRA-Drop folder")
        weights = self.weights_bytes()
        with atomic_folder(folder, replace=(folder / RECORD_FILE).is_file()) as building:
            if weights is not None:
                write_bytes_atomic(building / WEIGHTS_FILE, weights)
            write_text_atomic(building / RECORD_FILE, json.dumps(self.to_json(weights), indent=2) + "\n")
        return folder


def load_lora_drop(path: str | Path) -> LoraDrop:
    """The LoRA-Drop skipper a folder (or its ``lora-drop.json``) holds, its weights checked by size and checksum."""
    path = Path(path)
    record = path / RECORD_FILE if path.is_dir() else path
    if not record.is_file():
        raise LoraDropError(f"{path} is not a LoRA-Drop folder (no {RECORD_FILE}); make one with `skiplm lora-drop`.")
    return lora_drop_from_json(read_json(record, LoraDropError), record.parent, where=record)


def lora_drop_from_json(data: Any, folder: Path | None = None, *, where: Any = "the LoRA-Drop record") -> LoraDrop:
    """The skipper a record holds; its corrections read from ``folder`` (checked against the record)."""
    check_record(data, format_name=FORMAT_NAME, schema_version=SCHEMA_VERSION, error=LoraDropError,
                 what="a LoRA-Drop record", where=where)
    files = data.get("files") or {}
    if not isinstance(files, dict) or set(files) - {WEIGHTS_FILE}:
        raise LoraDropError(f"{where} lists files this skiplm does not know: {sorted(files)}.")
    corrections = None
    if WEIGHTS_FILE in files:
        if folder is None:
            raise LoraDropError(f"{where} has trained corrections in {WEIGHTS_FILE}: load the folder.")
        corrections = _read_weights(folder / WEIGHTS_FILE, files[WEIGHTS_FILE])
    try:
        model = ModelIdentity.from_json(data["model"]) if data.get("model") is not None else None
        return LoraDrop(num_layers=data["num_layers"], anchor_every=data["anchor_every"], rank=data["rank"],
                        droppable=tuple(data["droppable"]), corrections=corrections, model=model,
                        provenance=dict(data.get("provenance") or {}), forced_prompt=data.get("forced_prompt"))
    except KeyError as exc:
        raise LoraDropError(f"{where} is malformed (missing {exc}); make it again with `skiplm lora-drop`.") from None
    except (TypeError, PlanError) as exc:
        raise LoraDropError(f"{where} is malformed ({exc}).") from None
    except LoraDropError as exc:
        raise LoraDropError(f"{where}: {exc}") from None


def _read_weights(path: Path, check: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load

    if not path.is_file():
        raise LoraDropError(f"{path} is missing: the LoRA-Drop folder is incomplete.")
    data = path.read_bytes()
    check = check if isinstance(check, dict) else {}
    if check.get("bytes") is not None and len(data) != check["bytes"]:
        raise LoraDropError(f"{path} has {len(data)} bytes, {check['bytes']} were written: it is truncated or changed.")
    if check.get("sha256") is not None and hashlib.sha256(data).hexdigest() != check["sha256"]:
        raise LoraDropError(f"{path} does not match the checksum in {RECORD_FILE}: it was changed or damaged.")
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        raise LoraDropError(f"{path} is not a readable safetensors file ({exc}).") from None
    corrections: dict[int, list] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("down", "up"):
            raise LoraDropError(f"{path} holds an unexpected tensor {name!r}.")
        corrections.setdefault(int(parts[1]), [None, None])[parts[2] == "up"] = tensor
    if any(t is None for pair in corrections.values() for t in pair):
        raise LoraDropError(f"{path} lacks a down or up matrix for some layer.")
    return {index: (pair[0], pair[1]) for index, pair in corrections.items()}


def _ranges(indices) -> str:
    out, run = [], []
    for i in list(indices) + [None]:
        if run and (i is None or i != run[-1] + 1):
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        if i is not None:
            run.append(i)
    return ", ".join(out) or "none"


__all__ = ["FORMAT_NAME", "LoraDrop", "PAPER", "RECORD_FILE", "SCHEMA_VERSION", "WEIGHTS_FILE", "load_lora_drop",
           "lora_drop_from_json", "paper_droppable"]
