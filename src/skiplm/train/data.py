"""Text the full model generates itself, cached on disk: the data a layer-skipped student is distilled on.

Self-data distillation (Thangarasa et al. 2024, arXiv 2410.09982) trains the student on what the teacher itself
writes, so the data matches the teacher's distribution; LLM-QAT (Liu et al. 2023, arXiv 2305.17888) seeds each
generation with one token drawn uniformly from the vocabulary. :func:`self_generated` does both:

* **Seeds.** Sequences come in batches, each batch of one kind. A share ``chat_fraction`` of the batches (spread
  evenly: batch ``b`` is a chat batch when ``ceil((b + 1) * f) > ceil(b * f)``, so the first is one whenever
  ``f > 0``) start from the prompts of a registered prompt set (``gsm8k``: its questions, **taken from the end of the
  set**, so evaluations that use its first prompts do not meet them), each rendered as a user message in the
  tokenizer's chat template with the assistant turn opened (plain text when the tokenizer has no template). A prompt
  longer than half of ``length`` is passed over. The others start from the tokens the tokenizer puts before any text
  (a BOS token, or none) and one token drawn uniformly from the vocabulary, special tokens excluded.
* **Generation.** The model as it is (no skipper may be installed), in eval mode under ``torch.inference_mode`` (its
  training flag is put back afterwards), samples each batch left padded with its KV cache: ``temperature`` (0:
  greedy), then ``top_p``, nothing else (no repetition penalty or other processing a generation_config might ask
  for). Every batch draws from its own random stream, seeded from ``seed`` and its index, so a batch is the same
  whether it is generated in one run or after an interruption.
* **Length.** Every row is ``length`` tokens: its prompt, then what the model wrote, ending at the first
  end-of-sequence token (kept) or at ``length``; a row that ended early is padded on the right with the pad token.
  ``attention_mask`` marks the real tokens (prompt and generated), ``loss_mask`` the generated ones (a token the model
  sampled: the target of the prediction made at the position before it). The prompt is not the teacher's text, so a
  loss on what the model wrote uses ``loss_mask``; a distillation loss on the teacher's distributions may use every
  real position (``attention_mask``).
* **Cache.** Under ``cache_dir`` (default ``<skiplm cache>/self-generated``, see
  :func:`skiplm.models.loading.cache_dir`), one folder per model (its identity and a digest of every parameter
  tensor), tokenizer and settings (all but ``sequences``): one file per finished batch, each written atomically, and
  a ``manifest.json`` with each file's size and SHA-256. An interrupted generation resumes at its first missing
  batch; a request for fewer sequences than the cache holds is served from its first batches; a file that is missing,
  damaged or from other settings is regenerated, with a warning. Whole batches are always generated, so a request of
  ``sequences`` that is not a multiple of ``batch_size`` generates (and caches) up to ``batch_size - 1`` more; a
  request for fewer sequences than ``batch_size`` is served from a cached first batch, else generated as one batch of
  just those (``batch_size`` lowered to ``sequences``, as the returned settings say: a cache of its own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..files import write_bytes_atomic, write_text_atomic
from ..plan import ModelIdentity, model_identity

log = logging.getLogger(__name__)

CACHE_FORMAT = "skiplm-self-generated"
SCHEMA_VERSION = 1
MIN_LENGTH = 8  # a sequence must hold its seed and some generated text
MANIFEST = "manifest.json"
_SAMPLES_PER_PARAMETER = 32  # elements of every parameter tensor in the weight digest


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How the data is generated (recorded with it): ``sequences`` rows of ``length`` tokens each, generated
    ``batch_size`` at a time with ``temperature`` (0: greedy) and ``top_p`` from ``seed``; a share ``chat_fraction`` of
    them seeded from the chat prompts of ``prompt_set``, the rest from one token drawn uniformly from the vocabulary."""

    sequences: int = 256
    length: int = 256
    batch_size: int = 32  # the fastest of 8, 16, 32 for SmolLM2-135M on CPU (fp32)
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    chat_fraction: float = 0.5
    prompt_set: str = "gsm8k"

    def __post_init__(self):
        for name in ("sequences", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}.")
        if not _is_int(self.length) or self.length < MIN_LENGTH:
            raise DataError(f"length must be an integer of at least {MIN_LENGTH} tokens, got {self.length!r}.")
        if not _is_int(self.seed) or self.seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0 and math.isfinite(self.temperature)):
            raise DataError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise DataError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not (isinstance(self.chat_fraction, (int, float)) and 0 <= self.chat_fraction <= 1):
            raise DataError(f"chat_fraction must be in [0, 1], got {self.chat_fraction!r}.")

    @property
    def batches(self) -> int:
        """How many whole batches hold ``sequences``."""
        return -(-self.sequences // self.batch_size)

    def is_chat_batch(self, batch: int) -> bool:
        f = self.chat_fraction
        return math.ceil((batch + 1) * f - 1e-9) > math.ceil(batch * f - 1e-9)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class SelfGenerated:
    """Sequences a model generated itself: ``input_ids`` [N, length] (right padded), ``attention_mask`` (real tokens)
    and ``loss_mask`` (the tokens the model generated), both bool [N, length]; ``chat`` (bool [N]: seeded from a chat
    prompt) and ``prompt_index`` (long [N]: the row's prompt's index in ``settings.prompt_set``, -1 for a token-seeded
    row). ``seconds`` is how long generating these rows took (their batches', also when they came from the cache),
    ``generated`` how many of them this call generated (0: all from the cache), ``path`` the cache folder."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    chat: torch.Tensor
    prompt_index: torch.Tensor
    settings: GenerationSettings
    model: ModelIdentity
    seconds: float
    source: str
    path: Path | None = None
    generated: int = 0
    tokenizer: Any = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Real tokens (prompt and generated) in all rows."""
        return int(self.attention_mask.sum())

    @property
    def generated_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def prompts(self) -> tuple[int, ...]:
        """The indices (in ``settings.prompt_set``) of the chat prompts these rows were seeded from, sorted: what an
        evaluation on that set should leave out."""
        return tuple(sorted({int(i) for i in self.prompt_index.tolist() if i >= 0}))

    def text(self) -> str:
        """Every row decoded (its real tokens, special tokens left out), rows separated by blank lines."""
        if self.tokenizer is None:
            raise DataError("these sequences carry no tokenizer to decode them with.")
        rows = []
        for ids, mask in zip(self.input_ids, self.attention_mask):
            rows.append(self.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True).strip())
        return "\n\n".join(row for row in rows if row) + "\n"

    def to_text_file(self, path: str | Path) -> Path:
        """:meth:`text` as a UTF-8 text file (written atomically): a corpus file planners take."""
        return write_text_atomic(path, self.text())

    def split(self, held_out: int) -> tuple[SelfGenerated, SelfGenerated]:
        """(train, held out) by whole sequences: ``held_out`` rows spread evenly over the data (so both seed kinds are
        in it), the others in order."""
        n = len(self)
        if not _is_int(held_out) or not 0 < held_out < n:
            raise DataError(f"held_out must be between 1 and {n - 1} sequences (of {n}), got {held_out!r}.")
        held = torch.zeros(n, dtype=torch.bool)
        held[[int((j + 0.5) * n / held_out) for j in range(held_out)]] = True
        return self._rows(~held, "train part"), self._rows(held, "held-out part")

    def _rows(self, rows: torch.Tensor, what: str) -> SelfGenerated:
        count = int(rows.sum())
        return dataclasses.replace(
            self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
            loss_mask=self.loss_mask[rows], chat=self.chat[rows], prompt_index=self.prompt_index[rows],
            settings=dataclasses.replace(self.settings, sequences=count), source=f"{self.source} ({what}: {count})")


def default_cache_dir() -> Path:
    from ..models.loading import cache_dir

    return cache_dir() / "self-generated"


# -- the cache ----------------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter tensor: its name, dtype, shape and the exact bits of a few elements spread over it
    (any change to a tensor, such as a merged adapter, shows; a fraction of a second on any model)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)};".encode())
        if flat.numel():
            count = min(_SAMPLES_PER_PARAMETER, flat.numel())
            index = torch.arange(count, dtype=torch.long) * (flat.numel() - 1) // max(count - 1, 1)
            digest.update(flat[index.to(flat.device)].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def tokenizer_digest(tokenizer) -> str:
    """What the data depends on of a tokenizer: its size, special tokens, chat template and how it encodes a probe."""
    probe = "The quick brown fox, 1234 ünïcödé\n\tcode: x = [1, 2]"
    parts = [len(tokenizer), sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []),
             getattr(tokenizer, "chat_template", None) or "", list(tokenizer(probe).input_ids),
             list(_text_prefix(tokenizer))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _cache_key(model: nn.Module, identity: ModelIdentity, tokenizer, settings: GenerationSettings) -> dict[str, Any]:
    parameter = next(model.parameters())
    recorded = settings.to_json()
    del recorded["sequences"]  # a cache of more sequences serves fewer
    return {
        "model": {"model_type": identity.model_type, "num_layers": identity.num_layers,
                  "fingerprint": identity.fingerprint, "weights": weights_digest(model), "dtype": str(parameter.dtype)},
        "tokenizer": tokenizer_digest(tokenizer),
        "settings": recorded,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _chunk_name(index: int) -> str:
    return f"batch-{index:05d}.pt"


class _Cache:
    """One folder: ``manifest.json`` (the key, and per batch its file's name, size and SHA-256) and the batch files."""

    def __init__(self, folder: Path, key: dict[str, Any], key_hash: str):
        self.folder, self.key, self.key_hash = folder, key, key_hash
        self.chunks: dict[int, dict[str, Any]] = {}
        self._read_manifest()

    def _read_manifest(self) -> None:
        path = self.folder / MANIFEST
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != CACHE_FORMAT or data.get("schema_version") != SCHEMA_VERSION:
                raise ValueError("another format or schema version")
            if data.get("key") != self.key:
                raise ValueError("made for another model or other settings")
            self.chunks = {int(index): dict(entry) for index, entry in data["chunks"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("The self-generated data cache %s has an unreadable manifest (%s): generating it again.",
                        self.folder, exc)
            self.chunks = {}

    def _write_manifest(self, identity: ModelIdentity) -> None:
        data = {"format": CACHE_FORMAT, "schema_version": SCHEMA_VERSION, "key": self.key,
                "model_identity": identity.to_json(),
                "chunks": {str(index): entry for index, entry in sorted(self.chunks.items())}}
        write_text_atomic(self.folder / MANIFEST, json.dumps(data, indent=1) + "\n")

    def load(self, index: int, settings: GenerationSettings) -> dict[str, Any] | None:
        """Batch ``index`` if its file is whole and is the one the manifest names; else None (and a warning when a
        file was recorded but is missing or damaged)."""
        entry = self.chunks.get(index)
        if entry is None:
            return None
        path = self.folder / str(entry.get("file"))
        problem = None
        try:
            data = path.read_bytes()
        except OSError as exc:
            data, problem = None, f"it cannot be read ({exc.strerror or exc})"
        if data is not None and len(data) != entry.get("bytes"):
            problem = f"it is {len(data):,} bytes, the manifest says {entry.get('bytes')!r} (truncated or replaced)"
        elif data is not None and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            problem = "its SHA-256 differs from the manifest's (damaged or replaced)"
        chunk = None
        if problem is None:
            try:
                chunk = torch.load(io.BytesIO(data), weights_only=True)
                if chunk.get("key") != self.key_hash or chunk.get("index") != index:
                    problem = "it belongs to another cache or batch"
                elif tuple(chunk["input_ids"].shape) != (settings.batch_size, settings.length):
                    problem = f"its rows are {tuple(chunk['input_ids'].shape)}, not {(settings.batch_size, settings.length)}"
            except Exception as exc:  # noqa: BLE001 (torch raises many types for a bad file)
                problem = f"it does not load ({type(exc).__name__})"
        if problem is not None:
            log.warning("Batch %d of the self-generated data in %s is not usable: %s. Generating it again.", index,
                        self.folder, problem)
            del self.chunks[index]
            return None
        return chunk

    def store(self, index: int, chunk: dict[str, Any], identity: ModelIdentity) -> None:
        buffer = io.BytesIO()
        torch.save(chunk, buffer)
        data = buffer.getvalue()
        name = _chunk_name(index)
        write_bytes_atomic(self.folder / name, data)
        self.chunks[index] = {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                              "seconds": chunk["seconds"]}
        self._write_manifest(identity)


# -- seeds ----------------------------------------------------------------------------------------------------------
def _text_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (a BOS token, or nothing)."""
    try:
        return list(tokenizer("").input_ids)
    except Exception:  # noqa: BLE001 (a tokenizer that refuses empty text adds nothing we can learn this way)
        return []


def _seedable_tokens(model: nn.Module, tokenizer) -> torch.Tensor:
    """The ids a token-seeded row may start from: the vocabulary (as big as both the tokenizer and the embeddings),
    special tokens excluded."""
    size = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    allowed = torch.ones(size, dtype=torch.bool)
    special = [int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if 0 <= int(i) < size]
    allowed[special] = False
    if not allowed.any():
        raise DataError("the tokenizer has no ordinary (non-special) tokens to seed sequences from.")
    return allowed.nonzero().flatten()


class _PromptPool:
    """The chat prompts, from the end of the prompt set, encoded lazily; those longer than half of ``length`` passed
    over. Entry ``j`` is ``(index in the set, token ids)``; past the last fitting prompt the pool starts again."""

    def __init__(self, tokenizer, settings: GenerationSettings):
        self.tokenizer, self.settings = tokenizer, settings
        self.entries: list[tuple[int, list[int]]] = []
        self._prompts = None
        self._next = None  # the index of the next prompt to encode, counting down
        self._shortest: int | None = None

    def __getitem__(self, j: int) -> tuple[int, list[int]]:
        from ..models.data import encode_prompts, load_prompts

        if self._prompts is None:
            self._prompts = load_prompts(self.settings.prompt_set)
            self._next = len(self._prompts) - 1
        limit = self.settings.length // 2
        while len(self.entries) <= j and self._next >= 0:
            index, self._next = self._next, self._next - 1
            ids = encode_prompts(self.tokenizer, [self._prompts[index]])[0]
            self._shortest = len(ids) if self._shortest is None else min(self._shortest, len(ids))
            if len(ids) <= limit:
                self.entries.append((index, ids))
        if not self.entries:
            raise DataError(f"every prompt of {self.settings.prompt_set!r} is longer than half of the length "
                            f"({limit} tokens; the shortest is {self._shortest}): generate longer sequences (at least "
                            f"{2 * (self._shortest or 0)} tokens) or no chat-seeded ones (chat_fraction=0).")
        return self.entries[j % len(self.entries)]


def _batch_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"skiplm-self-generated:{seed}:{index}".encode()).digest()[:8], "little") >> 1


# -- generation -----------------------------------------------------------------------------------------------------
def _pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator) -> torch.Tensor:
    """The next token per row from logits [B, V]: the argmax (temperature 0), else a draw after temperature and
    top-p."""
    logits = logits.float()
    if settings.temperature == 0:
        return logits.argmax(-1)
    logits = logits / settings.temperature
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= settings.top_p  # the top-1 always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def _sample_rows(model: nn.Module, prompts: Sequence[Sequence[int]], settings: GenerationSettings,
                 generator: torch.Generator, eos_ids: Sequence[int], pad_token_id: int) -> list[list[int]]:
    """Sampled continuations of left-padded ``prompts``: row ``i`` gets at most ``length - len(prompts[i])`` tokens,
    ending at its first end-of-sequence token (kept)."""
    from ..models.generation import left_pad

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    budget = torch.as_tensor([settings.length - len(p) for p in prompts], device=device)  # [batch]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=device)
    finished = budget <= 0
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    steps = []
    for step in range(int(budget.max())):
        token = _pick(out.logits[:, -1], settings, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        steps.append(token)
        finished = finished | torch.isin(token, eos) | (budget <= step + 1)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    rows = []
    for row, limit in zip(generated, budget.tolist()):
        kept = []
        for token in row[:limit]:
            kept.append(int(token))
            if token in eos_ids:
                break
        rows.append(kept)
    return rows


def _generate_batch(model, tokenizer, settings: GenerationSettings, index: int, pool: _PromptPool | None,
                    seedable: torch.Tensor, eos_ids: Sequence[int], pad_token_id: int, key_hash: str) -> dict[str, Any]:
    start = time.perf_counter()
    device = next(model.parameters()).device
    seed = _batch_seed(settings.seed, index)
    cpu = torch.Generator().manual_seed(seed)
    sampling = torch.Generator(device=device).manual_seed(seed)
    size, length = settings.batch_size, settings.length
    chat = settings.is_chat_batch(index)
    if chat:
        offset = sum(settings.is_chat_batch(b) for b in range(index)) * size
        entries = [pool[offset + row] for row in range(size)]
        prompt_index = [entry[0] for entry in entries]
        prompts = [entry[1] for entry in entries]
    else:
        prefix = _text_prefix(tokenizer)
        first = seedable[torch.randint(len(seedable), (size,), generator=cpu)].tolist()
        prompt_index = [-1] * size
        prompts = [[*prefix, token] for token in first]
    continuations = _sample_rows(model, prompts, settings, sampling, eos_ids, pad_token_id)
    input_ids = torch.full((size, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((size, length), dtype=torch.bool)
    loss = torch.zeros((size, length), dtype=torch.bool)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        tokens = [*prompt, *continuation]
        input_ids[row, :len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        attention[row, :len(tokens)] = True
        loss[row, len(prompt):len(tokens)] = True
    return {"key": key_hash, "index": index, "input_ids": input_ids, "attention_mask": attention, "loss_mask": loss,
            "chat": chat, "prompt_index": torch.as_tensor(prompt_index, dtype=torch.long),
            "seconds": time.perf_counter() - start}


def self_generated(model: nn.Module, tokenizer, settings: GenerationSettings = GenerationSettings(), *,
                   cache_dir: str | Path | None = None,
                   progress: Callable[[int, int], None] | None = None) -> SelfGenerated:
    """``settings.sequences`` rows of ``settings.length`` tokens the model generated itself (see the module's
    docstring), from the cache under ``cache_dir`` where it has them, the rest generated (and cached batch by batch,
    so an interrupted call resumes). ``progress(done, total)`` is called with sequences after each batch. The model
    is left as it was."""
    from ..models.generation import context_length, eos_token_ids
    from ..runtime.hooks import HANDLE_ATTRIBUTE

    if not isinstance(settings, GenerationSettings):
        raise DataError(f"settings must be GenerationSettings, got {type(settings).__name__}.")
    if getattr(model, HANDLE_ATTRIBUTE, None) is not None:
        raise DataError("a skipper is installed on the model, but self-generated data comes from the full model: "
                        "remove it first (handle.remove()).")
    context = context_length(model)
    if context is not None and settings.length > context:
        raise DataError(f"length {settings.length:,} is beyond the model's context of {context:,} tokens: generate "
                        f"at most {context:,} tokens per sequence.")
    identity = model_identity(model)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = _open_cache(root, model, identity, tokenizer, settings)
    if settings.batch_size > settings.sequences and cache.load(0, settings) is None:
        # fewer sequences than a batch, and no cached batch to serve them from: one batch of just those
        settings = dataclasses.replace(settings, batch_size=settings.sequences)
        cache = _open_cache(root, model, identity, tokenizer, settings)
    folder, key_hash = cache.folder, cache.key_hash
    total = settings.batches * settings.batch_size
    chunks, generated = [], 0
    pool = seedable = eos_ids = pad_token_id = None
    was_training = model.training
    try:
        for index in range(settings.batches):
            chunk = cache.load(index, settings)
            if chunk is None:
                if eos_ids is None:  # first batch to generate: set up
                    model.eval()
                    eos_ids = eos_token_ids(model, tokenizer)
                    pad_token_id = _pad_token_id(model, tokenizer, eos_ids)
                    pool = _PromptPool(tokenizer, settings)
                    seedable = _seedable_tokens(model, tokenizer)
                chunk = _generate_batch(model, tokenizer, settings, index, pool, seedable, eos_ids, pad_token_id,
                                        key_hash)
                cache.store(index, chunk, identity)
                generated += settings.batch_size
            chunks.append(chunk)
            if progress is not None:
                progress(min((index + 1) * settings.batch_size, total), total)
    finally:
        model.train(was_training)
    n = settings.sequences
    cat = {name: torch.cat([c[name] for c in chunks])[:n] for name in
           ("input_ids", "attention_mask", "loss_mask", "prompt_index")}
    chat = torch.cat([torch.full((settings.batch_size,), bool(c["chat"])) for c in chunks])[:n]
    return SelfGenerated(
        input_ids=cat["input_ids"], attention_mask=cat["attention_mask"], loss_mask=cat["loss_mask"], chat=chat,
        prompt_index=cat["prompt_index"], settings=settings, model=identity,
        seconds=sum(float(c["seconds"]) for c in chunks), source=_describe(identity, settings, chat, cat),
        path=folder, generated=min(generated, n), tokenizer=tokenizer)


def _open_cache(root: Path, model, identity: ModelIdentity, tokenizer, settings: GenerationSettings) -> _Cache:
    key = _cache_key(model, identity, tokenizer, settings)
    key_hash = _key_hash(key)
    return _Cache(root / f"{identity.model_type}-{key_hash}", key, key_hash)


def _pad_token_id(model, tokenizer, eos_ids: Sequence[int]) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None),
                      getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if _is_int(candidate) and candidate >= 0:
            return candidate
    return int(eos_ids[0])


def _describe(identity: ModelIdentity, settings: GenerationSettings, chat: torch.Tensor, cat: dict) -> str:
    chats = int(chat.sum())
    prompts = len({int(i) for i in cat["prompt_index"].tolist() if i >= 0})
    sampling = "greedy" if settings.temperature == 0 else f"temperature {settings.temperature:g}, top-p {settings.top_p:g}"
    return (f"self-generated by {identity.name or identity.model_type}: {len(chat)} sequences x {settings.length} "
            f"tokens, {chats} from {prompts} {settings.prompt_set} chat prompts (taken from the end of the set), "
            f"{len(chat) - chats} from one uniformly drawn token; {sampling}, seed {settings.seed}")


__all__ = [
    "MIN_LENGTH",
    "GenerationSettings",
    "SelfGenerated",
    "default_cache_dir",
    "self_generated",
    "tokenizer_digest",
    "weights_digest",
]
