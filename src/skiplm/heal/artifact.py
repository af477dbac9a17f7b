"""The healed-model artifact: a skip plan plus what heals it, as one folder, and how it goes onto a model.

A heal folder holds ``heal.json`` and the files of each healing step, in the order they apply::

    heal.json               {"format": "skiplm.heal", "schema_version": 1, "method": "bridge+lora",
                             "plan": {...the skiplm.plan, with the model identity...},
                             "steps": [{"method": "bridge", "files": {"bridge.safetensors": {"sha256": .., "bytes": ..}},
                                        "spans": [{"blocks": [8, 9], "fold": "mlp-down", "parameter": ..., ...}]},
                                       {"method": "lora", "files": {"adapter/adapter_config.json": {...}, ...},
                                        "rank": 16, ...}],
                             "provenance": {"data": {...}, "steps": ..., "seconds": ..., "losses": [...], ...}}
    bridge.safetensors      one float32 [d, d] map ``T`` per span (see :mod:`skiplm.heal.spans` for where it folds)
    partial.safetensors     the trained weights of whole kept layers, by parameter name
    adapter/                a LoRA adapter in peft's own format (adapter_config.json, adapter_model.safetensors)

Weight steps (bridge, partial) apply in order over the original weights; the adapter goes on last. Every file is
checked by size and checksum on reading; a reader refuses a step method it does not know (a newer skiplm wrote it).

:class:`Healed` is a skipper (:mod:`skiplm.skipper`): ``skiplm.apply(model, healed)`` bakes the weight steps in
(``W' = T^T W`` for a down projection, ``E' = E T`` for the embedding, trained layers copied), attaches the adapter
(peft, in place) and applies the plan; the handle's ``remove()`` detaches the adapter and copies the original
weights back bit for bit. ``handle.disabled()`` runs the full model inside its block: plan off, adapter off and
original weights back (the full model is the teacher, never the healed one). ``merge=True`` (or
:meth:`Healed.merge`) bakes it all into the weights for good: no adapter overhead at run time, no full model left.
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
from ..files import atomic_folder, check_output, check_record, read_json, write_bytes_atomic, write_text_atomic
from ..plan import SkipPlan
from ..runtime import SkipHandle, check_free, check_layers, install_handle
from .spans import HealError, Span, resolve_spans

FORMAT_NAME = "skiplm.heal"
SCHEMA_VERSION = 1
HEAL_FILE = "heal.json"
BRIDGE_FILE = "bridge.safetensors"
LAYERS_FILE = "partial.safetensors"
ADAPTER_FOLDER = "adapter"  # peft's own format: PeftModel.from_pretrained(model, "<heal folder>/adapter") reads it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MERGED_ATTRIBUTE = "_skiplm_merged_heal"  # on a model: the digests of heals merged into its weights for good


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


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Deterministic bytes (a heal's digest hashes them): one metadata key, as safetensors orders several at random."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """peft calls a transformers method that transformers 5.x deprecates; that warning says nothing to our users."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# -- healing steps ---------------------------------------------------------------------------------------------------
# A step is one kind of healing with its own files. Weight steps (bridge, partial) give (parameter, healed value)
# pairs, applied in order over the original weights; the adapter step (lora) goes on last, as a peft adapter.
class BridgeStep:
    """ReplaceMe's least-squares map per span of skipped blocks (:mod:`skiplm.heal.bridge`), folded into a weight."""

    method = "bridge"

    def __init__(self, spans: list[Span], maps: dict[str, torch.Tensor], fit: list[dict[str, Any]] | None = None):
        self.spans = list(spans)
        self.maps = {name: tensor.detach().to(torch.float32).cpu().contiguous() for name, tensor in maps.items()}
        self.fit = list(fit or [{} for _ in self.spans])
        missing = [s.name for s in self.spans if s.name not in self.maps]
        if missing:
            raise HealError(f"the bridge has no map for span(s) {missing}; the heal folder is incomplete. Heal again.")

    def weights(self, model: nn.Module, plan: SkipPlan) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return folded_weights(model, resolve_spans(model, plan), self.maps)

    def files(self) -> dict[str, bytes]:
        return {BRIDGE_FILE: _safetensors_bytes(self.maps)}

    def record(self) -> dict[str, Any]:
        return {"spans": [{**span.to_json(), **fit} for span, fit in zip(self.spans, self.fit)]}

    @classmethod
    def read(cls, files: dict[str, bytes], record: dict[str, Any], plan: SkipPlan, where: Path) -> BridgeStep:
        from .spans import check_block_plan

        maps = _read_safetensors(files[BRIDGE_FILE], where / BRIDGE_FILE)
        try:
            spans = [Span(int(s["blocks"][0]), int(s["blocks"][-1]), str(s["fold"]), str(s["parameter"]))
                     for s in record["spans"]]
            fit = [{k: s[k] for k in ("residual_before", "residual_after") if k in s} for s in record["spans"]]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise HealError(f"{where / HEAL_FILE}: malformed span record ({exc!r}); heal again.") from None
        if [(s.start, s.end) for s in spans] != check_block_plan(plan) or any(
                s.fold not in ("mlp-down", "embedding") for s in spans):
            raise HealError(f"{where / HEAL_FILE}: its spans do not match its plan's skipped blocks; the file was "
                            "edited. Heal again.")
        for span in spans:
            tensor = maps.get(span.name)
            if tensor is None or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
                raise HealError(f"{where / BRIDGE_FILE} has no square map {span.name!r} for blocks "
                                f"{span.start}..{span.end}; heal again.")
        return cls(spans, maps, fit)


class LayersStep:
    """Whole kept layers trained (``partial``): their new weights by parameter name, copied over the originals."""

    method = "partial"

    def __init__(self, tensors: dict[str, torch.Tensor], layers: list[int]):
        self.tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        self.layers = sorted(layers)

    def weights(self, model: nn.Module, plan: SkipPlan) -> list[tuple[nn.Parameter, torch.Tensor]]:
        parameters = dict(model.named_parameters())
        pairs = []
        for name, value in self.tensors.items():
            param = parameters.get(name)
            if param is None or param.shape != value.shape:
                found = "missing" if param is None else f"shaped {tuple(param.shape)}"
                raise HealError(f"the healed layer weight {name} {tuple(value.shape)} does not fit this model "
                                f"({found}): the heal folder was made for another model.")
            pairs.append((param, value.to(device=param.device, dtype=param.dtype)))
        return pairs

    def files(self) -> dict[str, bytes]:
        return {LAYERS_FILE: _safetensors_bytes(self.tensors)}

    def record(self) -> dict[str, Any]:
        return {"layers": self.layers}

    @classmethod
    def read(cls, files: dict[str, bytes], record: dict[str, Any], plan: SkipPlan, where: Path) -> LayersStep:
        layers = record.get("layers")
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise HealError(f"{where / HEAL_FILE}: the partial step has no list of layers; heal again.")
        return cls(_read_safetensors(files[LAYERS_FILE], where / LAYERS_FILE), layers)


class AdapterStep:
    """A LoRA adapter (peft) trained on the skipped model; saved in peft's own folder format under ``adapter/``."""

    method = "lora"

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config = config  # a peft LoraConfig
        self.state = {name: t.detach().cpu().contiguous() for name, t in state.items()}

    def attach(self, model: nn.Module):
        """Inject the adapter into ``model`` (in place) and load its weights; returns (peft model, detach())."""
        import copy

        from peft import get_peft_model, set_peft_model_state_dict

        if getattr(model, "peft_config", None):
            raise HealError("this model already carries a peft adapter; a LoRA-healed model goes onto a model "
                            "without one (unload it first).")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        with peft_quietly():
            peft_model = get_peft_model(model, copy.deepcopy(self.config))

        def detach() -> None:
            peft_model.unload()
            for param, flag in flags:
                param.requires_grad_(flag)

        try:
            result = set_peft_model_state_dict(peft_model, self.state)
        except RuntimeError as exc:  # torch's load_state_dict: shapes that do not match
            detach()
            first = str(exc).split("size mismatch for ", 2)[1].split(":")[0] if "size mismatch" in str(exc) else exc
            raise HealError(f"the LoRA adapter does not fit this model (wrong shapes, e.g. {first}): it was made for "
                            "another model.") from None
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            detach()
            raise HealError(f"the LoRA adapter does not fit this model ({len(missing)} adapter weight(s) missing, "
                            f"{len(result.unexpected_keys)} unexpected, e.g. "
                            f"{(missing + list(result.unexpected_keys))[:2]}): it was made for another model.")
        peft_model.eval()
        return peft_model, detach

    def merge(self, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Add the adapter's low-rank updates into ``model``'s weights; returns (parameter, original value) pairs."""
        from peft.tuners.lora import LoraLayer

        peft_model, detach = self.attach(model)
        originals = [(m.get_base_layer().weight, m.get_base_layer().weight.detach().clone())
                     for m in model.modules() if isinstance(m, LoraLayer)]
        peft_model.merge_and_unload()
        detach()  # unload after merging: the modules are plain again; only the requires_grad flags are left to restore
        return originals

    def files(self) -> dict[str, bytes]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # peft writes its config file itself (its own JSON form)
            self.config.save_pretrained(tmp)
            config = (Path(tmp) / ADAPTER_CONFIG).read_bytes()
        return {f"{ADAPTER_FOLDER}/{ADAPTER_CONFIG}": config,
                f"{ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}": _safetensors_bytes(self.state)}

    def record(self) -> dict[str, Any]:
        return {"rank": self.config.r, "alpha": self.config.lora_alpha,
                "target_modules": sorted(self.config.target_modules or []),
                "layers": sorted(self.config.layers_to_transform or [])}

    @classmethod
    def read(cls, files: dict[str, bytes], record: dict[str, Any], plan: SkipPlan, where: Path) -> AdapterStep:
        from peft import LoraConfig

        try:
            config = LoraConfig.from_pretrained(str(where / ADAPTER_FOLDER))
        except Exception as exc:  # noqa: BLE001 (peft raises several types for a bad config)
            raise HealError(f"{where / ADAPTER_FOLDER / ADAPTER_CONFIG} is not a readable peft LoRA config ({exc}); "
                            "heal again.") from None
        state = _read_safetensors(files[f"{ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}"], where / ADAPTER_FOLDER / ADAPTER_WEIGHTS)
        return cls(config, state)


STEPS = {step.method: step for step in (BridgeStep, LayersStep, AdapterStep)}


class _WeightSwap:
    """Healed values copied into parameters in place (in order: a later step may overwrite an earlier one's), and
    the originals kept to copy back exactly."""

    def __init__(self, pairs: list[tuple[nn.Parameter, torch.Tensor]]):
        self.pairs = pairs
        unique = {id(param): param for param, _ in pairs}
        self.originals = [(param, param.detach().clone()) for param in unique.values()]

    @torch.no_grad()
    def bake(self) -> None:
        for param, healed in self.pairs:
            param.copy_(healed)

    @torch.no_grad()
    def restore(self) -> None:
        for param, original in self.originals:
            param.copy_(original)


RESTORABLE = "restorable"  # merge mode: baked into the weights like merge=True, the originals restored on remove()


def _copy_back(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, original in pairs:
            param.copy_(original)


class HealHandle(SkipHandle):
    """A healed plan on a model: the weight steps baked in and the adapter attached (reversibly unless merged), and
    the plan applied. ``remove()`` undoes all three; ``peft_model`` is the attached adapter's peft model, if any."""

    def __init__(self, model: nn.Module, plan: SkipPlan, swap: _WeightSwap | None, adapter: AdapterStep | None,
                 merge: bool = False):
        self.swap_weights = swap  # None: merged for good (or nothing to bake)
        self.adapter = adapter
        self.merge = merge
        self.peft_model = None
        super().__init__(model, plan)

    def _install(self) -> None:
        keep = self.merge in (False, RESTORABLE)  # the original weights come back on remove()
        if self.swap_weights is not None:
            self.swap_weights.bake()
            if keep:
                self._restore.append(self.swap_weights.restore)  # undone last (remove() pops in reverse)
            else:
                self.swap_weights = None
        if self.adapter is not None:
            if not self.merge:
                self.peft_model, detach = self.adapter.attach(self.model)
                self._restore.append(detach)
            else:
                originals = self.adapter.merge(self.model)
                if keep:
                    self._restore.append(lambda: _copy_back(originals))
        super()._install()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The full model inside this block: the plan off, the adapter off and the original weights back (restored
        bit for bit)."""
        if self.merge:
            raise HealError("this healed model was merged into the weights for good: the full model is gone from it. "
                            "Apply without merge=True to keep the full model available.")
        adapter_off = self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext()
        with super().disabled(), adapter_off:
            swap = self.swap_weights
            if swap is not None:
                swap.restore()
            try:
                yield
            finally:
                if swap is not None:
                    swap.bake()


class Healed:
    """A plan and the steps that heal it (:func:`load_healed` reads one; :func:`skiplm.heal.heal` makes one)."""

    input_adaptive = False

    def __init__(self, plan: SkipPlan, steps: list, *, method: str | None = None,
                 provenance: dict[str, Any] | None = None):
        if plan.model is None:
            raise HealError("a healed plan must name the model it was made for; stamp it with plan.for_model(model).")
        kinds = [step.method for step in steps]
        if not steps or len(set(kinds)) != len(kinds) or ("lora" in kinds and kinds[-1] != "lora"):
            raise HealError(f"a heal has one step of each kind, an adapter last; got {kinds}.")
        self.plan = plan
        self.steps = list(steps)
        self.method = method or "+".join(kinds)
        self.provenance = dict(provenance or {})

    def step(self, method: str):
        """This heal's step of kind ``method`` (``bridge``, ``partial``, ``lora``), or None."""
        return next((step for step in self.steps if step.method == method), None)

    # the bridge's spans, maps and fit records (empty without a bridge step)
    @property
    def spans(self) -> list[Span]:
        bridge = self.step("bridge")
        return bridge.spans if bridge else []

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        bridge = self.step("bridge")
        return bridge.maps if bridge else {}

    @property
    def fit(self) -> list[dict[str, Any]]:
        bridge = self.step("bridge")
        return bridge.fit if bridge else []

    def then(self, step, *, provenance: dict[str, Any] | None = None) -> Healed:
        """This heal followed by one more step (a trained adapter or layers on top of a bridge)."""
        return Healed(self.plan, [*self.steps, step], provenance={**self.provenance, **(provenance or {})})

    # -- the skipper protocol ----------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.plan.num_layers

    def check_model(self, model: nn.Module) -> None:
        from ..plan import check_made_for

        check_made_for(model, self.plan.num_layers, self.plan.model, what="heal folder",
                       remedy="Heal a plan made for this model with `skiplm heal`")

    def describe(self) -> str:
        spans = f", {len(self.spans)} span(s)" if self.spans else ""
        return f"{self.plan.describe()}, healed ({self.method}{spans})"

    def teacher_forced(self) -> Healed:
        return self  # a block plan skips the same in prefill and decode

    def is_empty(self) -> bool:
        return False

    def install(self, model: nn.Module, *, check_model: bool = True, merge: bool | str = False) -> HealHandle:
        """Bake the weight steps into ``model``, attach the adapter and apply the plan; ``remove()`` restores the
        original model exactly. ``merge=True``: for good (the adapter added into the weights: no adapter overhead at
        run time; the handle then removes only the plan). ``merge="restorable"``: merged the same way, the original
        weights kept (a copy of every weight the heal touches) and restored on ``remove()``."""
        if merge not in (False, True, RESTORABLE):
            raise HealError(f"merge must be False, True or {RESTORABLE!r}, got {merge!r}.")

        def handle() -> HealHandle:
            swap = self._fold(model)
            installed = HealHandle(model, self.plan, swap, self.step("lora"), merge=merge)
            if merge is True:
                self._mark_merged(model)
            return installed

        return install_handle(self, model, handle, check_model=check_model, what="heal folder")

    def merge(self, model: nn.Module, *, check_model: bool = True) -> None:
        """Bake the heal into ``model``'s weights for good (no plan applied: apply ``self.plan`` to run it)."""
        check_free(model)
        check_layers(self, model, check_model, "heal folder")
        self._fold(model).bake()
        if self.step("lora") is not None:
            self.step("lora").merge(model)
        self._mark_merged(model)

    def _fold(self, model: nn.Module) -> _WeightSwap:
        """The model's weights with the weight steps applied (not yet swapped in); a heal merged already is refused."""
        if self._digest() in getattr(model, _MERGED_ATTRIBUTE, ()):
            raise HealError("this heal is already merged into the model's weights; applying it again would heal "
                            "twice. Apply its plan instead: skiplm.apply(model, healed.plan, check_model=False).")
        return _WeightSwap([pair for step in self.steps if step.method != "lora"
                            for pair in step.weights(model, self.plan)])

    @contextlib.contextmanager
    def baked(self, model: nn.Module) -> Iterator[nn.Module]:
        """The heal in ``model``'s weights inside the block (adapter merged, no plan applied), the originals back
        after it."""
        check_free(model)
        swap = self._fold(model)
        swap.bake()
        merged = []
        try:
            if self.step("lora") is not None:
                merged = self.step("lora").merge(model)
            yield model
        finally:
            _copy_back(merged)
            swap.restore()

    def _mark_merged(self, model: nn.Module) -> None:
        object.__setattr__(model, _MERGED_ATTRIBUTE, (*getattr(model, _MERGED_ATTRIBUTE, ()), self._digest()))

    def _digest(self) -> str:
        digest = hashlib.sha256()
        for step in self.steps:
            for name, data in sorted(step.files().items()):
                digest.update(name.encode() + hashlib.sha256(data).digest())
        return digest.hexdigest()

    # -- files -------------------------------------------------------------------------------------------------------
    def to_json(self, files: list[dict[str, bytes]] | None = None) -> dict[str, Any]:
        files = [step.files() for step in self.steps] if files is None else files
        steps = [{"method": step.method,
                  "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                            for name, data in step_files.items()},
                  **step.record()} for step, step_files in zip(self.steps, files)]
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "description": self.describe(),
            "plan": self.plan.to_json(),
            "steps": steps,
            "provenance": self.provenance,
        }

    def save(self, folder: str | Path) -> Path:
        """Write the heal folder (``heal.json`` + each step's files), whole or not at all; an earlier heal folder
        there is replaced once the new one is complete, any other non-empty folder refused."""
        folder = check_output(folder, kind="folder", what="heal folder")
        replace = (folder / HEAL_FILE).is_file()
        files = [step.files() for step in self.steps]
        with atomic_folder(folder, replace=replace) as building:
            for step_files in files:
                for name, data in step_files.items():
                    (building / name).parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(building / name, data)
            if self.step("lora") is not None:  # peft's folder also names its base model; ours is in heal.json
                write_text_atomic(building / ADAPTER_FOLDER / "README.md", _ADAPTER_README)
            write_text_atomic(building / HEAL_FILE, json.dumps(self.to_json(files), indent=2) + "\n")
        return folder


_ADAPTER_README = ("A LoRA adapter in peft's format, trained by `skiplm heal` for the layer-skip plan in ../heal.json.\n"
                   "Without that plan applied it is not meant to be used: load the whole heal folder with\n"
                   "skiplm.load_healed(folder) and skiplm.apply(model, healed).\n")


def load_healed(folder: str | Path) -> Healed:
    """The healed plan a folder written by ``skiplm heal`` (or :meth:`Healed.save`) holds, checked whole."""
    folder = Path(folder)
    if folder.is_file() and folder.name == HEAL_FILE:
        folder = folder.parent
    record = folder / HEAL_FILE
    if not folder.is_dir() or not record.is_file():
        raise HealError(f"{folder} is not a heal folder (no {HEAL_FILE} in it); make one with `skiplm heal`.")
    data = check_record(read_json(record, HealError, "Heal again with `skiplm heal`."), format_name=FORMAT_NAME,
                        schema_version=SCHEMA_VERSION, error=HealError, what="a skiplm heal record", where=record)
    try:
        plan = SkipPlan.from_json(data["plan"])
        steps = list(data["steps"])
    except (KeyError, TypeError) as exc:
        raise HealError(f"{record} is malformed (missing {exc}); heal again with `skiplm heal`.") from None
    except PlanError as exc:
        raise HealError(f"{record}: its plan is invalid: {exc}") from None
    known = [step.get("method") if isinstance(step, dict) else step for step in steps]
    if not steps or any(kind not in STEPS for kind in known):
        raise HealError(f"{record} has healing steps {known} this skiplm cannot apply (it knows "
                        f"{', '.join(STEPS)}): upgrade skiplm.")
    read = []
    for step in steps:
        if "file" in step:  # the first bridge-only files: one file, its checks beside it
            step = {**step, "files": {step["file"]: {"sha256": step.get("sha256"), "bytes": step.get("bytes")}}}
        files = _read_files(folder, step.get("files"))
        try:
            read.append(STEPS[step["method"]].read(files, step, plan, folder))
        except KeyError as exc:
            raise HealError(f"{record}: the {step['method']} step lists no file {exc}; heal again.") from None
    try:
        return Healed(plan, read, method=str(data.get("method") or ""), provenance=dict(data.get("provenance") or {}))
    except HealError as exc:
        raise HealError(f"{record}: {exc}") from None


def _read_files(folder: Path, listed: Any) -> dict[str, bytes]:
    """The files a step lists, each checked against its recorded size and checksum."""
    if not isinstance(listed, dict) or not listed:
        raise HealError(f"{folder / HEAL_FILE} has a step without files; heal again with `skiplm heal`.")
    out = {}
    for name, check in listed.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise HealError(f"{folder / HEAL_FILE} names a file outside the heal folder ({name}).")
        if not path.is_file():
            raise HealError(f"{path} is missing: the heal folder is incomplete. Heal again with `skiplm heal`.")
        data = path.read_bytes()
        check = check if isinstance(check, dict) else {}
        if check.get("bytes") is not None and len(data) != check["bytes"]:
            raise HealError(f"{path} has {len(data)} bytes, {check['bytes']} were written: it is truncated or was "
                            "changed. Heal again with `skiplm heal`.")
        if check.get("sha256") is not None and hashlib.sha256(data).hexdigest() != check["sha256"]:
            raise HealError(f"{path} does not match the checksum in {HEAL_FILE}: it was changed or damaged. Heal "
                            "again.")
        out[name] = data
    return out


def _read_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return dict(load(data))
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for damaged files)
        raise HealError(f"{path} is not a readable safetensors file ({exc}); heal again with `skiplm heal`.") from None


__all__ = [
    "ADAPTER_FOLDER",
    "AdapterStep",
    "BRIDGE_FILE",
    "BridgeStep",
    "LAYERS_FILE",
    "LayersStep",
    "STEPS",
    "FORMAT_NAME",
    "HEAL_FILE",
    "SCHEMA_VERSION",
    "HealHandle",
    "Healed",
    "folded_weights",
    "load_healed",
]
