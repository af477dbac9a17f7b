"""The draft cache: a speculative draft's weights, made once per model and precision, kept on disk and in the process.

Why. Making a low-precision draft is paid before the first token: for the default model in int8-dynamic, computing
the quantized weights took ~1.2-1.6 s of a ~2.4-2.8 s setup (1 thread on a busy 2-core machine: indicative). They
depend only on the model's weights, the precision and the engine, so they are computed once and stored; a later
process reads them (~0.1 s for the default model's 129 MiB) and only packs them for the kernels (~0.8 s for
int8-dynamic, which fbgemm's opaque packed format keeps from being stored; nothing for int8) and compiles (~0.15 s):
a setup of ~1.1-1.5 s (int8: ~0.7 s, from ~2.5 s).

Where. ``<skiplm cache>/drafts/`` (:func:`skiplm.models.loading.cache_dir`: ``$SKIPLM_CACHE_DIR``, else
``~/.cache/skiplm``), one folder per model (name and parameter fingerprint), engine and precision, e.g.
``smollm2-135m-1a2b3c4d5e6f-lean-int8-dynamic/``, holding ``weights.safetensors`` (the products' stored forms,
:func:`skiplm.speculative.quantize.draft_tensors`, by name) and ``manifest.json`` (the key, the file's size, the model
identity, when and how long it took to build). The skip set is not part of the key: both engines store every layer,
and a plan only chooses which run.

The key. The model's identity (:func:`skiplm.plan.model_identity`: family, layer count, the fingerprint of parameter
names and shapes), a digest of its weights (:func:`skiplm.train.data.weights_digest`: every parameter's name, dtype,
shape and the exact bits of elements spread over it; the self-generated data cache uses it too), the engine, the
precision, the cache's format version and torch's version; for a trained draft
(:mod:`skiplm.speculative.trained`), its adapter's digest too, and the folder's name ends in ``-lora-<digest>`` — a
trained draft never reads an untrained entry, nor the other way round, and the two are kept side by side. An entry whose manifest holds another key (other weights:
the model changed; another torch or format), whose weights file is missing, of another size than the manifest says
(truncated), does not load, or whose tensors do not fit the model (names, shapes, dtypes) is rebuilt and replaced,
with a warning saying why. A draft only proposes tokens the full model verifies, so a stale draft could cost speed,
never correctness; a weight changed where the digest does not look (it samples each tensor) would go unnoticed.

Writing is atomic: the entry is written under a temporary name beside its folder and renamed whole
(:func:`skiplm.files.atomic_folder`); an interrupted write leaves no entry, never a partial one. A failed write (a full
or read-only disk) is a warning; the draft still runs.

In the process. A :class:`DraftCache` also keeps the lean engines it made (weights, compiled loop) while the model
lives; a second decoder given the same cache object shares them (:meth:`~skiplm.speculative.lean.LeanDraft.shared`)
instead of building again. A decoder keeps its cache; pass one to several decoders to share.

Off and clearing. ``SpeculativeDecoder(..., draft_cache=False)``, ``SKIPLM_DRAFT_CACHE=0`` in the environment, or
``--no-draft-cache`` on the commands turn it off; models under :data:`MIN_PARAMETERS` parameters (built in
milliseconds) and float32 drafts (the model's own weights, folded) are not stored. ``skiplm draft-cache`` lists the entries, ``skiplm draft-cache --clear`` (or
:meth:`DraftCache.clear`, or deleting the folder) removes them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_folder
from ..plan import model_identity
from .quantize import DraftWeights, StoredDraftMismatch, draft_copy, precision_name
from .stats import SetupStats

log = logging.getLogger(__name__)

CACHE_FORMAT = "skiplm-draft-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ENVIRONMENT = "SKIPLM_DRAFT_CACHE"  # "0", "off", "false" or "no": no draft cache by default
MIN_PARAMETERS = 10_000_000  # smaller models make their drafts in milliseconds: not worth a file
_OFF = ("0", "off", "false", "no")


def default_root() -> Path:
    """``<skiplm cache>/drafts`` (see :func:`skiplm.models.loading.cache_dir`)."""
    from ..models.loading import cache_dir

    return cache_dir() / "drafts"


def enabled_by_environment() -> bool:
    """Whether ``$SKIPLM_DRAFT_CACHE`` leaves the draft cache on (it is on unless set to 0 / off / false / no)."""
    return os.environ.get(ENVIRONMENT, "").strip().lower() not in _OFF


class DraftCache:
    """Draft weights by model, engine and precision: in this process (lean engines), and on disk under ``root``
    (default :func:`default_root`, resolved when first used) for models of at least ``min_parameters`` parameters
    (default :data:`MIN_PARAMETERS`). See the module docstring."""

    def __init__(self, root: str | Path | None = None, *, min_parameters: int | None = None):
        self._root = Path(root) if root is not None else None
        self.min_parameters = MIN_PARAMETERS if min_parameters is None else min_parameters
        self._engines: dict[str, tuple[weakref.ref, Any]] = {}  # key digest -> (the model, its LeanDraft)

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = default_root()
        return self._root

    # -- the key -------------------------------------------------------------------------------------------------
    def key(self, model: nn.Module, engine: str, precision: str, adapter=None) -> dict[str, Any]:
        """What an entry must have been made from to serve ``model`` in ``precision`` by ``engine`` — with
        ``adapter`` (a trained draft's :class:`~skiplm.speculative.trained.DraftAdapter`), its digest too (an
        untrained draft's key has no ``adapter`` field, so the two never serve each other)."""
        from ..train.data import weights_digest

        identity = model_identity(model)
        parameter = next(model.parameters())
        key = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "torch": torch.__version__, "engine": engine,
               "precision": precision_name(precision),
               "model": {"name": identity.name, "model_type": identity.model_type, "num_layers": identity.num_layers,
                         "fingerprint": identity.fingerprint, "weights": weights_digest(model),
                         "dtype": str(parameter.dtype)}}
        if adapter is not None:
            key["adapter"] = {"method": adapter.method, "digest": adapter.digest()}
        return key

    def folder(self, key: dict[str, Any]) -> Path:
        """The entry for ``key``: one per model (name and fingerprint), engine, precision and trained adapter (if
        any: ``-lora-<digest>``) — other weights of the same model replace it."""
        model = key["model"]
        name = str(model["name"] or model["model_type"])
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or model["model_type"])[:48] or "model"
        tag = hashlib.sha256(f"{name}\0{model['fingerprint']}".encode()).hexdigest()[:12]
        adapter = key.get("adapter")
        trained = f"-{adapter['method']}-{adapter['digest'][:12]}" if adapter else ""
        return self.root / f"{slug}-{tag}-{key['engine']}-{key['precision']}{trained}"

    def stores(self, model: nn.Module) -> bool:
        """Whether drafts of ``model`` are stored on disk (large enough to be worth it)."""
        return sum(p.numel() for p in model.parameters()) >= self.min_parameters

    # -- drafts --------------------------------------------------------------------------------------------------
    def lean(self, model: nn.Module, precision: str, setup: SetupStats | None = None, *, adapter=None,
             vocab: torch.Tensor | None = None):
        """The lean engine (:class:`~skiplm.speculative.lean.LeanDraft`) of ``model`` in ``precision``, warmed up:
        shared with one this cache made in this process, else from stored weights, else built (and stored).
        ``adapter``: a trained draft's adapter, merged into the engine's weights (and part of the key). ``vocab``: the
        token ids of a reduced-vocabulary head (:mod:`skiplm.speculative.vocab`) — part of the key of the engines kept
        in this process; the entry on disk holds the whole head, whose rows serve every vocabulary."""
        from .lean import LeanDraft

        setup = setup if setup is not None else SetupStats()
        start = time.perf_counter()
        key = self.key(model, "lean", precision, adapter)
        digest = _digest(key)
        if vocab is not None:
            ids = torch.as_tensor(vocab, dtype=torch.long).flatten().cpu().numpy().tobytes()
            digest += "-vocab-" + hashlib.sha256(ids).hexdigest()[:12]
        setup.key_seconds += time.perf_counter() - start
        known = self._engines.get(digest)
        if known is not None and known[0]() is model:
            setup.draft_source = "memory"
            return known[1].shared()

        def build(weights: DraftWeights) -> LeanDraft:
            # a trained draft: from a view of the model with its adapter merged (the model itself is untouched)
            source = adapter.merged(model) if adapter is not None else model
            return LeanDraft(source, precision, weights=weights, vocab=vocab)

        lean, source = self._made(model, key, build, setup)
        lean.warm_up()
        setup.record_engine(lean.setup, source)
        self._engines = {d: entry for d, entry in self._engines.items() if entry[0]() is not None}
        self._engines[digest] = (weakref.ref(model), lean)
        return lean

    def modules_copy(self, model: nn.Module, precision: str, setup: SetupStats | None = None, *,
                     adapter=None) -> nn.Module:
        """A copy of ``model``'s modules in ``precision`` (:func:`~skiplm.speculative.quantize.draft_copy`) whose int8
        products come from stored weights where there are some (else made, and stored). Never shared between
        decoders: a draft applies its plan to its modules. ``adapter``: a trained draft's adapter, merged into the
        copy's weights (and part of the key)."""
        setup = setup if setup is not None else SetupStats()
        name = precision_name(precision)
        if name not in ("int8", "int8-dynamic"):  # a cast copy: nothing worth storing
            start = time.perf_counter()
            copied = draft_copy(model, name, adapter=adapter)
            setup.copy_seconds += time.perf_counter() - start
            setup.draft_source = "built"
            return copied
        start = time.perf_counter()
        key = self.key(model, "modules", name, adapter)
        setup.key_seconds += time.perf_counter() - start

        def build(weights: DraftWeights) -> nn.Module:
            built = time.perf_counter()
            copied = draft_copy(model, name, weights, adapter=adapter)
            products = weights.quantize_seconds + weights.pack_seconds
            setup.copy_seconds += time.perf_counter() - built - products  # the deep copy and cast
            setup.quantize_seconds += weights.quantize_seconds
            setup.pack_seconds += weights.pack_seconds
            return copied

        copied, source = self._made(model, key, build, setup)
        setup.draft_source = source
        return copied

    def _made(self, model: nn.Module, key: dict[str, Any], build, setup: SetupStats):
        """``build(weights)`` from the stored entry for ``key`` where it is usable, else from the model's weights
        (then stored); returns what it built and ``"disk"`` or ``"built"``."""
        folder = self.folder(key)
        stores = self.stores(model) and key["precision"] != "float32"
        setup.cache_path = str(folder) if stores else None
        if key["precision"] == "float32":
            setup.cache_note = "not stored (a float32 draft computes with the model's own weights)"
        elif not stores:
            setup.cache_note = f"not stored (a model under {self.min_parameters:,} parameters builds in moments)"
        else:
            device = next(model.parameters()).device
            start = time.perf_counter()
            stored = self._read(folder, key, device, setup)
            setup.load_seconds += time.perf_counter() - start
            if stored is not None:
                weights = DraftWeights(key["precision"], stored)
                try:
                    return build(weights), "disk"
                except StoredDraftMismatch as exc:
                    self._unusable(folder, f"it does not fit this model: {exc}", setup)
        weights = DraftWeights(key["precision"])
        started = time.perf_counter()
        built = build(weights)
        seconds = time.perf_counter() - started
        if stores and weights.tensors:
            self._write(folder, key, weights.tensors, model, seconds, setup)
        return built, "built"

    # -- disk ----------------------------------------------------------------------------------------------------
    def _read(self, folder: Path, key: dict[str, Any], device: torch.device,
              setup: SetupStats) -> dict[str, torch.Tensor] | None:
        """The stored tensors of the entry in ``folder`` if it is whole and made for ``key``; else None (with a
        warning when there was an entry)."""
        if not folder.exists():
            setup.cache_note = "no entry yet: built now, and stored"
            return None
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            return self._unusable(folder, f"its manifest is unreadable ({type(exc).__name__}: {exc})", setup)
        if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
            return self._unusable(folder, f"its manifest is not a version-{CACHE_VERSION} {CACHE_FORMAT} manifest",
                                  setup)
        if manifest.get("key") != key:
            return self._unusable(folder, _difference(manifest.get("key"), key), setup)
        path = folder / str(manifest.get("file", WEIGHTS))
        try:
            size = path.stat().st_size
        except OSError:
            return self._unusable(folder, f"its weights file {path.name} is missing", setup)
        if size != manifest.get("bytes"):
            return self._unusable(folder, f"its weights file is {size:,} bytes, the manifest says "
                                          f"{manifest.get('bytes')!r} (truncated or replaced)", setup)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(device)) as file:
                if (file.metadata() or {}).get("key") != _digest(key):
                    return self._unusable(folder, "its weights file belongs to another entry", setup)
                return {name: _aligned(file.get_tensor(name)) for name in file.keys()}
        except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types for a damaged file
            return self._unusable(folder, f"its weights file does not load ({type(exc).__name__}: {exc})", setup)

    def _unusable(self, folder: Path, reason: str, setup: SetupStats) -> None:
        log.warning("The draft cache entry %s is not usable: %s. Building the draft again (the entry is replaced).",
                    folder, reason)
        setup.cache_note = f"rebuilt: {reason}"
        return None

    def _write(self, folder: Path, key: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
               build_seconds: float, setup: SetupStats) -> None:
        from safetensors.torch import save_file

        start = time.perf_counter()
        seen: set[tuple[int, int]] = set()
        plain = {}
        for name, tensor in tensors.items():  # safetensors refuses tensors that share memory
            tensor = tensor.detach().to("cpu").contiguous()
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            plain[name] = tensor.clone() if ident in seen else tensor
            seen.add(ident)
        try:
            with atomic_folder(folder, replace=True) as temporary:
                save_file(plain, str(temporary / WEIGHTS), metadata={"key": _digest(key)})
                manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "file": WEIGHTS,
                            "bytes": (temporary / WEIGHTS).stat().st_size, "tensors": len(plain),
                            "model_identity": model_identity(model).to_json(),
                            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "build_seconds": round(build_seconds, 3)}
                (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            log.warning("Could not store the draft in the draft cache (%s): %s. The draft runs; the next run builds "
                        "it again.", folder, exc)
            setup.cache_note = f"not stored: {exc}"
        setup.store_seconds += time.perf_counter() - start

    # -- housekeeping --------------------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every entry on disk: its folder, size in bytes and manifest (None where unreadable)."""
        found = []
        if not self.root.is_dir():
            return found
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                manifest = None
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            found.append({"folder": folder, "bytes": size, "manifest": manifest})
        return found

    def clear(self) -> int:
        """Delete every entry on disk (and forget this process's engines); returns the bytes freed."""
        freed = sum(entry["bytes"] for entry in self.entries())
        if self.root.is_dir():
            shutil.rmtree(self.root)
        self._engines.clear()
        return freed


def resolve_draft_cache(draft_cache: DraftCache | bool | str | Path | None) -> DraftCache | None:
    """What a decoder's ``draft_cache=`` means: a :class:`DraftCache` as given, a folder (a cache there), False (none),
    or None / True (the default cache, unless ``$SKIPLM_DRAFT_CACHE`` turns it off)."""
    if isinstance(draft_cache, DraftCache):
        return draft_cache
    if draft_cache is False:
        return None
    if draft_cache is None or draft_cache is True:
        return DraftCache() if enabled_by_environment() else None
    return DraftCache(draft_cache)


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory aligned as torch's allocator aligns it (64 bytes): safetensors' tensors may start
    anywhere, and torch's int8-weight CPU kernel crashed on a weight that did not start at such a boundary."""
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _difference(stored: Any, key: dict[str, Any]) -> str:
    """Why a stored key is not ``key``, in words."""
    if not isinstance(stored, dict):
        return "its manifest records no key"
    if stored.get("torch") != key["torch"]:
        return f"it was made with torch {stored.get('torch')}, this is {key['torch']}"
    if stored.get("adapter") != key.get("adapter"):
        return ("it holds an untrained draft, this one is trained" if not stored.get("adapter") else
                "it holds a trained draft, this one is untrained" if not key.get("adapter") else
                "it holds a draft with another trained adapter")
    if (stored.get("engine"), stored.get("precision")) != (key["engine"], key["precision"]):
        return (f"it holds a {stored.get('precision')} draft for the {stored.get('engine')} engine, not "
                f"{key['precision']} for {key['engine']}")
    model = stored.get("model")
    if not isinstance(model, dict):
        return "its manifest records no model"
    for field, what in (("fingerprint", "another model (other parameter names or shapes)"),
                        ("model_type", "another model family"), ("dtype", "weights in another dtype"),
                        ("weights", "other weights (the model's weights changed since)")):
        if model.get(field) != key["model"].get(field):
            return f"it was made for {what}"
    return "its key differs from this draft's (made by another version of skiplm)"


__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "ENVIRONMENT", "MIN_PARAMETERS", "DraftCache", "default_root",
           "enabled_by_environment", "resolve_draft_cache"]
