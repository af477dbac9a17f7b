"""A reduced-vocabulary draft head: the draft computes logits over the N most frequent tokens only.

Why. A draft's output head is a product by the whole embedding table: on the default model 49,152 x 576 = 28M of the
draft's ~134M weights (about a fifth of a lean draft step), and on models with 262k-token vocabularies most of a step.
Restricted to the tokens a model actually writes, the head shrinks by the vocabulary's ratio.

Lossless. The full model verifies every token, so the restriction only changes what the draft proposes: greedy, a
draft's token is the argmax over the subset; sampling, the draft distribution ``q`` is over the subset (zero
elsewhere: the lean engine returns ``-inf`` logits there), tokens are drawn from that ``q``, and speculative rejection
sampling (accept with ``min(1, p / q)``, else draw from ``norm(max(0, p - q))``) still gives the full model's
distribution — a token outside the subset is never drafted and is produced by the correction draw, whose residual is
``p`` there.

Which tokens (a documented, cached choice). :func:`token_counts` counts every token of the *second half* of each
source corpus (registered corpora, :data:`skiplm.registry.CORPORA`; default ``gsm8k`` and ``pydoc``, the corpora the
default model ships with): the benchmark prompt sets (:func:`skiplm.speculative.bench.prompt_set`) and the planners'
calibration text (:func:`skiplm.planners.load_calibration`) read from the start of the corpora, so counting never sees
the prompts the draft is measured on. :func:`draft_vocabulary` takes the ``size`` most frequent ones (ties: lower id
first), the tokenizer's special tokens always among them (a draft must be able to propose the end of a turn). The
counts are kept on disk per tokenizer (a digest of its vocabulary) and sources, under ``<skiplm cache>/draft-vocab/``
(:func:`skiplm.models.loading.cache_dir`), as JSON; any size is then a moment's work.

Where it is used. ``SpeculativeDecoder(..., draft_vocab=)``, ``--draft-vocab N`` on ``skiplm generate --speculative``,
``bench-speculative`` (several sizes, paired in one run), ``draft-search`` (recorded in the draft plan's provenance,
``draft.vocab``: :func:`plan_draft_vocab`) and ``serve``. Only the lean engine (:mod:`skiplm.speculative.lean`)
drafts over a subset; its draft cache entry holds the whole head (each row is quantized on its own, so the rows of a
stored head are the stored form of those rows) and serves every size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DataError
from ..files import write_text_atomic

DEFAULT_SOURCES = ("gsm8k", "pydoc")
COUNTS_FORMAT = "skiplm-draft-vocab-counts"
COUNTS_VERSION = 1
PART = "second half"  # of each source's text: what is counted (the prompt sets read the first part)


@dataclasses.dataclass(frozen=True)
class DraftVocab:
    """The tokens a draft proposes from: ``ids`` (sorted token ids, long), the ``size`` asked for, where their
    frequencies were counted (``sources``), and ``coverage``: the fraction of the counted tokens they hold."""

    ids: torch.Tensor
    size: int
    sources: tuple[str, ...]
    coverage: float

    def describe(self) -> str:
        return (f"the {self.size:,} most frequent tokens of {', '.join(self.sources)} ({PART}; "
                f"{self.coverage:.1%} of their tokens)")

    def to_json(self) -> dict[str, Any]:
        """What a draft plan records (``provenance.draft.vocab``): enough to make the same set again."""
        return {"size": self.size, "sources": list(self.sources), "part": PART, "coverage": round(self.coverage, 6)}


def _tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def _counts_path(tokenizer, sources: Sequence[str]):
    from ..models.loading import cache_dir

    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in
                   str(getattr(tokenizer, "name_or_path", "") or "tokenizer").rstrip("/").split("/")[-1])[:40]
    tag = hashlib.sha256(f"{_tokenizer_digest(tokenizer)}\0{','.join(sources)}\0{PART}".encode()).hexdigest()[:12]
    return cache_dir() / "draft-vocab" / f"{name or 'tokenizer'}-{tag}.json"


def token_counts(tokenizer, sources: Sequence[str] = DEFAULT_SOURCES, *, cache: bool = True) -> torch.Tensor:
    """How often each token id occurs in the second half of each of ``sources`` (registered corpora or text files),
    tokenized by ``tokenizer``: a long tensor [len(tokenizer)]. Kept on disk per tokenizer and sources (``cache``)."""
    from ..models.data import load_corpus

    sources = tuple(sources)
    if not sources:
        raise DataError("a draft vocabulary needs at least one source corpus to count tokens on.")
    size = len(tokenizer)
    path = _counts_path(tokenizer, sources) if cache else None
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("format") == COUNTS_FORMAT and stored.get("version") == COUNTS_VERSION and \
                    stored.get("vocab_size") == size:
                counts = torch.zeros(size, dtype=torch.long)
                ids, values = zip(*stored["counts"]) if stored["counts"] else ((), ())
                counts[torch.tensor(ids, dtype=torch.long)] = torch.tensor(values, dtype=torch.long)
                return counts
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: counted again and replaced
    counts = torch.zeros(size, dtype=torch.long)
    for source in sources:
        text = load_corpus(source)
        # in paragraphs (each with the blank line after it), one batch: no sequence longer than the tokenizer's limit
        paragraphs = [part + "\n\n" for part in text[len(text) // 2:].split("\n\n") if part]
        ids = [i for row in tokenizer(paragraphs, add_special_tokens=False).input_ids for i in row]
        ids = torch.tensor(ids, dtype=torch.long)
        counts += torch.bincount(ids[ids < size], minlength=size)
    if path is not None:
        nonzero = counts.nonzero().flatten().tolist()
        write_text_atomic(path, json.dumps({"format": COUNTS_FORMAT, "version": COUNTS_VERSION, "sources": sources,
                                            "part": PART, "vocab_size": size,
                                            "counts": [[i, int(counts[i])] for i in nonzero]}) + "\n")
    return counts


def draft_vocabulary(tokenizer, size: int | None, sources: Sequence[str] = DEFAULT_SOURCES, *,
                     vocab_size: int | None = None, cache: bool = True) -> DraftVocab | None:
    """The ``size`` most frequent tokens of ``sources`` (:func:`token_counts`; ties: lower id first), the tokenizer's
    special tokens always included; None for the whole vocabulary (``size`` None or 0, or at least the model's
    ``vocab_size``: its output head's rows, default the tokenizer's length)."""
    if size is None or size == 0:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DataError(f"a draft vocabulary size is a positive number of tokens (0: the whole vocabulary), got "
                        f"{size!r}.")
    vocab_size = vocab_size or len(tokenizer)
    if size >= vocab_size:
        return None
    sources = tuple(sources)
    counts = token_counts(tokenizer, sources, cache=cache)
    if counts.shape[0] < vocab_size:  # a head with more rows than the tokenizer has tokens (padded vocabularies)
        counts = torch.cat([counts, counts.new_zeros(vocab_size - counts.shape[0])])
    counts = counts[:vocab_size]
    special = sorted({i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab_size})
    if size < len(special):
        raise DataError(f"a draft vocabulary of {size} tokens cannot hold the tokenizer's {len(special)} special "
                        "tokens; give a larger size.")
    ranked = counts.clone()
    ranked[special] = counts.max() + 1  # always in
    order = torch.sort(-ranked, stable=True).indices  # most frequent first; equal counts keep the lower id first
    ids = torch.sort(order[:size]).values
    total = int(counts.sum())
    coverage = float(counts[ids].sum()) / total if total else 0.0
    return DraftVocab(ids, size, sources, coverage)


def plan_draft_vocab(plan) -> dict[str, Any] | None:
    """The draft vocabulary a draft plan records (``provenance.draft.vocab``, from ``skiplm draft-search
    --draft-vocab``), or None (the whole vocabulary)."""
    found = ((getattr(plan, "provenance", None) or {}).get("draft") or {}).get("vocab") if plan is not None else None
    return found if isinstance(found, dict) and found.get("size") else None


def resolve_draft_vocab(tokenizer, size: int | None, plan=None, *, vocab_size: int | None = None) -> DraftVocab | None:
    """What ``--draft-vocab`` means on a command: ``size`` when given (0: the whole vocabulary, whatever the plan
    says), else the vocabulary the draft ``plan`` records, else None."""
    if size is not None:
        return draft_vocabulary(tokenizer, size, vocab_size=vocab_size)
    recorded = plan_draft_vocab(plan)
    if recorded is None:
        return None
    return draft_vocabulary(tokenizer, int(recorded["size"]), tuple(recorded.get("sources") or DEFAULT_SOURCES),
                            vocab_size=vocab_size)


__all__ = ["DEFAULT_SOURCES", "DraftVocab", "draft_vocabulary", "plan_draft_vocab", "resolve_draft_vocab",
           "token_counts"]
