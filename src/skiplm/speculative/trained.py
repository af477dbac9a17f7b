"""Trained drafts for self-speculative decoding (LayerSkip, Kangaroo): a skip-set draft with a LoRA adapter distilled
toward the full model.

Why. A draft that skips blocks proposes what the skipped model would write; each drafted token is accepted with
probability ``sum_v min(p(v), q(v))`` (``p`` the full model's next-token distribution, ``q`` the draft's), so the
closer ``q`` is to ``p``, the more tokens a round keeps. Untrained, the default model's skip-set drafts lost more
acceptance than skipping saved. Training the draft toward the full model optimises exactly that number:
:func:`train_draft` distils a LoRA adapter on the linear layers the draft plan still runs, by KL(full || draft) per
token (:func:`skiplm.train.distill.distill`: the teacher is the same weights with the plan and the adapter off; the
held-out evaluations report the acceptance proxy ``sum min(p, q)`` before and after).

Only the draft is trained. The full model verifies with its own weights, unchanged, so the output stays exactly plain
decoding's (greedy: token for token; sampled: the full model's distribution). How the adapter reaches the draft, per
engine (:mod:`skiplm.speculative.drafts`, :mod:`skiplm.speculative.lean`):

* a draft *copy* (any draft precision: the lean engine, or a ``modules`` copy from
  :func:`~skiplm.speculative.quantize.draft_copy`) is made from :meth:`DraftAdapter.merged` — a view of the model
  whose adapted linear layers hold ``W + dW`` (peft's own merge), every other tensor shared with the model — so the
  LoRA is merged into the copy's weights *before* they are cast or quantized; the model itself is never touched and
  the draft runs at the plan's speed, with no adapter cost per step;
* the ``modules`` engine with no copy (the model's own weights draft, ``draft_dtype=None``) attaches the adapter to
  the model in place (peft) together with the plan (:meth:`DraftAdapter.on`: a :class:`~skiplm.heal.Healed` skipper),
  and the verifier runs the model inside the handle's ``disabled()``, which switches the plan *and* the adapter off:
  peft's LoRA layers then return their base layer's output, bit for bit (the tests compare the logits).

The draft cache (:mod:`skiplm.speculative.cache`) keys a trained draft on its adapter's digest (:meth:`DraftAdapter.digest`),
in memory and on disk, so a trained draft never reuses an untrained entry, nor the other way round.

Files. A trained draft is a draft plan (``skiplm draft-search`` / ``skiplm draft-train``, JSON) and its adapter in a
folder beside it, ``<plan>.adapter/`` (``draft.json`` -> ``draft.adapter/``), in peft's own format
(``adapter_config.json``, ``adapter_model.safetensors``) plus ``draft-adapter.json`` (the skip set it was trained
for, its digest, how it was trained). The plan's provenance names the folder and the digest (``draft.adapter``);
:func:`load_trained_draft` reads both and refuses an adapter that is missing or is not the one the plan names.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SkipLMError
from ..files import atomic_folder, check_record, read_json, write_bytes_atomic, write_text_atomic
from ..plan import SkipPlan
from ..registry import DRAFTS, Option

PAPER = ("Elhoushi et al. 2024, LayerSkip (arXiv 2404.16710); Liu et al. 2024, Kangaroo (arXiv 2404.18911); "
         "Hu et al. 2021, LoRA")
ADAPTER_SUFFIX = ".adapter"  # draft.json -> draft.adapter/
RECORD_FILE = "draft-adapter.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_NAME = "skiplm.draft-adapter"
SCHEMA_VERSION = 1


class DraftAdapterError(SkipLMError):
    """A trained draft's adapter cannot be trained, read or used as asked."""


# -- the adapter -----------------------------------------------------------------------------------------------------
class DraftAdapter:
    """A LoRA adapter (a peft ``LoraConfig`` and its weights, by peft's state-dict names) trained for the skip set of
    a draft plan. ``record``: what it was trained for and how (``blocks``: the decode skip set as a plan's JSON,
    ``training``: :func:`~skiplm.train.distill.distill`'s record). Immutable in use: its :meth:`digest` keys caches."""

    method = "lora"

    def __init__(self, config, state: dict[str, torch.Tensor], record: dict[str, Any] | None = None):
        self.config = config
        self.state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state.items()}
        self.record = dict(record or {})
        self._files: dict[str, bytes] | None = None

    # -- identity --------------------------------------------------------------------------------------------------
    def files(self) -> dict[str, bytes]:
        """peft's two files, as bytes (deterministic for the same adapter: the digest hashes them)."""
        if self._files is None:
            import tempfile

            from safetensors.torch import save

            from ..heal.artifact import peft_quietly

            with tempfile.TemporaryDirectory() as tmp, peft_quietly():
                self.config.save_pretrained(tmp)  # peft writes its own JSON form of the config
                config = (Path(tmp) / ADAPTER_CONFIG).read_bytes()
            weights = save({k: v for k, v in sorted(self.state.items())}, metadata={"format": "pt"})
            self._files = {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: weights}
        return self._files

    def digest(self) -> str:
        """SHA-256 (24 hex digits) of the adapter's config and weights: what the draft cache and the plan record."""
        h = hashlib.sha256()
        for name, data in sorted(self.files().items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()[:24]

    @property
    def rank(self) -> int:
        return int(self.config.r)

    @property
    def training_seconds(self) -> float:
        """How long training it took (0 when not recorded)."""
        return float((self.record.get("training") or {}).get("seconds", 0.0))

    def describe(self) -> str:
        training = self.record.get("training") or {}
        held = training.get("held_out") or {}
        first = (training.get("evaluations") or [{}])[0]
        trained = (f", acceptance proxy {first['acceptance']:.3f} -> {held['acceptance']:.3f} after "
                   f"{training.get('steps')} steps ({training.get('seconds', 0):.0f} s)"
                   if "acceptance" in held and "acceptance" in first else "")
        return f"LoRA r{self.rank} on {len(self.config.target_modules or [])} linear layers{trained}"

    def check_plan(self, plan: SkipPlan) -> None:
        """Refuse a plan whose decode skip set is not the one this adapter was trained for."""
        trained_for = self.record.get("decode")
        if trained_for is not None and trained_for != plan.decode.to_json():
            raise DraftAdapterError(f"this draft adapter was trained for another skip set ({trained_for}), not "
                                    f"{plan.describe()}: train one for this plan with `skiplm draft-train`.")

    # -- on a model ------------------------------------------------------------------------------------------------
    def _step(self):
        from ..heal.artifact import AdapterStep

        return AdapterStep(self.config, self.state)

    def merged(self, model: nn.Module) -> nn.Module:
        """A view of ``model`` with this adapter merged into the weights of the linear layers it adapts (peft's own
        merge: ``W + scale * B A``): those weights are new tensors, every other parameter and buffer is ``model``'s
        own (shared, not copied). ``model`` is left exactly as it was. What a draft copy is made from; do not change
        the view in place (cast it, train it): its shared tensors are the model's."""
        from peft.tuners.lora import LoraLayer

        from ..heal.artifact import HealError, peft_quietly

        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        view = copy.deepcopy(model, memo=dict(shared))  # modules copied; tensors shared
        try:
            peft_model, detach = self._step().attach(view)
        except HealError as exc:
            raise DraftAdapterError(str(exc)) from None
        try:
            with torch.no_grad():
                for module in view.modules():
                    if isinstance(module, LoraLayer):  # its own weight, so the merge cannot reach the model's
                        base = module.get_base_layer()
                        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
                with peft_quietly():
                    peft_model.merge_and_unload()
        finally:
            detach()  # the model's requires_grad flags back (peft froze the shared parameters)
        return view.eval()

    def on(self, plan: SkipPlan, model: nn.Module):
        """``plan`` with this adapter attached in place (a :class:`~skiplm.heal.Healed` skipper): ``skiplm.apply``
        attaches the adapter (peft) and applies the plan; the handle's ``disabled()`` switches both off (the
        verifier's view: the full model, bit for bit) and ``remove()`` detaches the adapter."""
        from ..heal.artifact import Healed

        stamped = plan if plan.model is not None else plan.for_model(model)
        return Healed(stamped, [self._step()], provenance={"draft-lora": self.record})

    # -- files -----------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "method": self.method,
                "digest": self.digest(), "rank": self.rank, "alpha": self.config.lora_alpha,
                "target_modules": sorted(self.config.target_modules or []),
                "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for name, data in self.files().items()},
                **self.record}

    def save(self, folder: str | Path) -> Path:
        """The adapter folder (peft's files and ``draft-adapter.json``), whole or not at all; an earlier adapter
        folder there is replaced."""
        folder = Path(folder)
        replace = (folder / RECORD_FILE).is_file()
        with atomic_folder(folder, replace=replace) as building:
            for name, data in self.files().items():
                write_bytes_atomic(building / name, data)
            write_text_atomic(building / RECORD_FILE, json.dumps(self.to_json(), indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> DraftAdapter:
        """The adapter a folder written by :meth:`save` holds, its files checked by size and checksum."""
        from peft import LoraConfig
        from safetensors.torch import load

        from ..heal.artifact import peft_quietly

        folder = Path(folder)
        path = folder / RECORD_FILE
        if not path.is_file():
            raise DraftAdapterError(f"{folder} is not a draft adapter folder (no {RECORD_FILE}); train one with "
                                    "`skiplm draft-train`.")
        record = check_record(read_json(path, DraftAdapterError, "Train the draft again."), format_name=FORMAT_NAME,
                              schema_version=SCHEMA_VERSION, error=DraftAdapterError,
                              what="a skiplm draft adapter record", where=path)
        for name, check in (record.get("files") or {}).items():
            data = (folder / name).read_bytes() if (folder / name).is_file() else None
            if data is None:
                raise DraftAdapterError(f"{folder / name} is missing: the adapter folder is incomplete.")
            if len(data) != check.get("bytes") or hashlib.sha256(data).hexdigest() != check.get("sha256"):
                raise DraftAdapterError(f"{folder / name} does not match the size or checksum in {RECORD_FILE}: it "
                                        "was changed or damaged. Train the draft again.")
        try:
            with peft_quietly():
                config = LoraConfig.from_pretrained(str(folder))
            state = dict(load((folder / ADAPTER_WEIGHTS).read_bytes()))
        except Exception as exc:  # noqa: BLE001 (peft and safetensors raise several types for bad files)
            raise DraftAdapterError(f"{folder} does not hold a readable peft LoRA adapter ({exc}).") from None
        kept = {k: v for k, v in record.items() if k in ("paper", "decode", "plan", "precision", "options",
                                                         "training", "seconds")}
        adapter = cls(config, state, kept)
        # its identity is the files as written (peft's JSON of a config read back may differ, e.g. in key order)
        adapter._files = {name: (folder / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        if record.get("digest") not in (None, adapter.digest()):
            raise DraftAdapterError(f"{folder}: its files do not give the digest its record names; train again.")
        return adapter


# -- training ----------------------------------------------------------------------------------------------------------
def _lora_config(model: nn.Module, plan: SkipPlan, rank: int, alpha: float, modules: str):
    from peft import LoraConfig

    from ..heal.spans import HealError
    from ..heal.train import kept_linears

    try:
        targets = kept_linears(model, plan, modules)
    except HealError as exc:
        raise DraftAdapterError(str(exc)) from None
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, lora_dropout=0.0, bias="none")


def split_held_out(data: Any, held_out: int):
    """``data`` (token-id sequences, :meth:`skiplm.train.distill.Sequences.of`) split into training and its last
    ``held_out`` sequences (the held-out evaluations: KL, acceptance proxy)."""
    from ..heal.spans import HealError
    from ..heal.train import _split

    try:
        return _split(data, held_out)
    except HealError as exc:
        raise DraftAdapterError(str(exc)) from None


@DRAFTS.register(
    "lora",
    paper=PAPER,
    needs={"plan", "calibration"},
    summary="a skip-set draft with a LoRA adapter on its kept layers, distilled toward the full model (KL)",
    options=(
        Option("rank", int, 16, "LoRA rank"),
        Option("alpha", float, 0.0, "LoRA alpha (0: twice the rank)"),
        Option("modules", str, "all", "which linear layers of the kept layers get an adapter",
               ("all", "attention", "mlp")),
        Option("held_out", int, 8, "sequences kept out of training for the evaluations"),
    ),
    extra={"trains": True},
)
def train_draft(model: nn.Module, plan: SkipPlan, data: Any, *, held_out: int = 8, rank: int = 16,
                alpha: float = 0.0, modules: str = "all", settings=None, precision: str | None = None,
                run_dir: str | Path | None = None, resume: bool = False,
                progress: Callable[[int, int, dict[str, float]], None] | None = None) -> DraftAdapter:
    """Train a LoRA adapter (rank ``rank``) on the linear layers ``plan`` still runs, toward the full model: KL of
    the next-token distributions on ``data`` (token-id sequences: the model's own text, :func:`draft_training_data`),
    its last ``held_out`` sequences kept for the evaluations (:func:`skiplm.train.distill.distill`; ``settings``: a
    :class:`~skiplm.train.distill.TrainSettings`; ``run_dir`` / ``resume``: a resumable run folder). ``precision``:
    the draft precision it is meant for (recorded only: training runs in the model's dtype, bf16 autocast where the
    hardware has it; the adapter is merged before the draft's weights are cast or quantized). ``model`` is unchanged
    afterwards."""
    from ..heal.artifact import peft_quietly
    from ..heal.spans import HealError, checked_plan
    from ..train.distill import TrainError, TrainSettings, TrainingInterrupted, distill

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DraftAdapterError(f"rank must be a whole number >= 1, got {rank!r}.")
    try:
        plan = checked_plan(model, plan, "draft training trains")
    except HealError as exc:
        raise DraftAdapterError(str(exc)) from None
    if plan.decode.is_empty():
        raise DraftAdapterError("the draft plan skips nothing: a full-depth draft is the full model, there is nothing "
                                "to train (give a plan that skips blocks).")
    settings = settings if settings is not None else TrainSettings()
    train, evaluation = split_held_out(data, held_out)
    config = _lora_config(model, plan, rank, alpha, modules)
    options = {"rank": rank, "alpha": alpha or 2 * rank, "modules": modules, "held_out": held_out}
    identity = {"method": "draft-lora", "plan": plan.to_json(), "options": options}
    start = time.perf_counter()
    try:
        with peft_quietly():
            result = distill(model, plan, train, evaluation, adapter=config, settings=settings, run_dir=run_dir,
                             resume=resume, progress=progress, identity=identity)
    except TrainingInterrupted:
        raise
    except TrainError as exc:
        raise DraftAdapterError(str(exc)) from None
    record = {"paper": PAPER, "decode": plan.decode.to_json(), "plan": plan.describe(), "precision": precision,
              "options": options, "seconds": round(time.perf_counter() - start, 1), "training": result.record}
    return DraftAdapter(result.step.config, result.step.state, record)


def draft_training_data(model: nn.Module, tokenizer, *, sequences: int = 128, length: int = 256, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None):
    """Text the full model writes itself (:func:`skiplm.train.data.self_generated`, cached on disk): what a draft
    must predict at decode time. Chat rows are seeded from GSM8K questions taken from the *end* of the set, the
    others from one random token, so the prompts ``bench-speculative`` decodes (the first GSM8K questions, pydoc
    text) are never trained on."""
    from ..train.data import GenerationSettings, self_generated

    return self_generated(model, tokenizer, GenerationSettings(sequences=sequences, length=length, seed=seed),
                          progress=progress)


# -- a draft plan and its adapter, on disk -----------------------------------------------------------------------------
def adapter_folder(plan_path: str | Path) -> Path:
    """Where the adapter of the draft plan at ``plan_path`` lives: ``<plan without suffix>.adapter/``."""
    path = Path(plan_path)
    return path.with_name(path.stem + ADAPTER_SUFFIX)


def with_adapter(plan: SkipPlan, adapter: DraftAdapter, folder_name: str) -> SkipPlan:
    """``plan`` whose provenance names its adapter (``draft.adapter``: folder, digest, rank, training time)."""
    draft = {**(plan.provenance.get("draft") or {}),
             "adapter": {"folder": folder_name, "digest": adapter.digest(), "method": adapter.method,
                         "rank": adapter.rank, "training_seconds": adapter.training_seconds}}
    return dataclasses.replace(plan, provenance={**plan.provenance, "draft": draft})


def save_trained_draft(plan: SkipPlan, adapter: DraftAdapter, path: str | Path) -> Path:
    """Write the draft plan to ``path`` and its adapter beside it (:func:`adapter_folder`); the adapter first, so a
    plan naming an adapter never exists without it."""
    adapter.check_plan(plan)
    folder = adapter.save(adapter_folder(path))
    return with_adapter(plan, adapter, folder.name).save(path)


def recorded_adapter(plan: SkipPlan | None) -> dict[str, Any] | None:
    """What a draft plan's provenance says of its adapter (None: an untrained draft)."""
    found = ((plan.provenance or {}).get("draft") or {}).get("adapter") if plan is not None else None
    return found if isinstance(found, dict) else None


def load_adapter_for(plan_path: str | Path, plan: SkipPlan | None = None) -> DraftAdapter | None:
    """The adapter the draft plan at ``plan_path`` names (None when it names none), checked: present, the digest the
    plan records, trained for the plan's skip set. A plan that names an adapter never drafts without it."""
    plan = plan if plan is not None else SkipPlan.load(plan_path)
    found = recorded_adapter(plan)
    if found is None:
        return None
    folder = Path(plan_path).parent / str(found.get("folder", ""))
    if not found.get("folder") or not folder.is_dir():
        raise DraftAdapterError(f"the draft plan {plan_path} names the adapter folder {folder}, which is missing: "
                                "copy it beside the plan, or train the draft again with `skiplm draft-train`.")
    adapter = DraftAdapter.load(folder)
    if adapter.digest() != found.get("digest"):
        raise DraftAdapterError(f"{folder} holds another adapter than the draft plan {plan_path} names (digest "
                                f"{adapter.digest()}, the plan says {found.get('digest')}).")
    adapter.check_plan(plan)
    return adapter


def load_trained_draft(path: str | Path) -> tuple[SkipPlan, DraftAdapter | None]:
    """A draft plan file and its adapter (None for an untrained draft plan)."""
    plan = SkipPlan.load(path)
    return plan, load_adapter_for(path, plan)


__all__ = ["ADAPTER_SUFFIX", "DraftAdapter", "DraftAdapterError", "adapter_folder", "draft_training_data",
           "load_adapter_for", "load_trained_draft", "recorded_adapter", "save_trained_draft", "split_held_out",
           "train_draft", "with_adapter"]
