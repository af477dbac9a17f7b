"""Self-speculative decoding against plain greedy decoding, in the same run: tokens/s, speedup, acceptance, fallbacks,
and whether every output was identical — per prompt set, batch size and draft. Writes JSON + markdown + a plot.

Each measurement unit is one batch of prompts: plain greedy decoding (:func:`~skiplm.speculative.plain_generate`) and
then every draft decode it, in an order that alternates between rounds; a draft's speedup is the plain time over its
time summed over the batches of a round; the median over rounds is reported, and every round's ratio is kept in the
JSON. A draft's fallback monitor and adaptive draft length are kept for the whole run, so they carry over
between batches as they would in use; a skip-plan draft is applied to the model only for its own turns (several plan
drafts share the one model), a lower-precision copy is made once.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError, PlanError
from ..measure.perplexity import tokenize_corpus
from ..models.data import encode_prompts, load_corpus, load_prompts
from ..models.generation import left_pad
from ..plan import SkipPlan
from ..registry import CORPORA, PROMPT_SETS
from ..report.files import markdown_table, write_json
from ..report.plots.speculative import plot_speculative_speedups
from .controllers import AdaptiveDraftLength, DraftSelector, SpeedMonitor
from .decoder import DEFAULT_MAX_DRAFT, SpeculativeDecoder, plain_generate
from .drafts import PromptLookup, draft_alternatives, draft_engines, draft_precision
from .stats import SpeculativeOutput, SpeculativeStats


@dataclasses.dataclass(frozen=True)
class Draft:
    """A draft to measure, by name: a skip plan and / or a precision, how its copy runs, the skip sets it may switch
    among, and whether prompt lookup joins it (what a :class:`~skiplm.speculative.SpeculativeDecoder` is made from)."""

    name: str
    plan: SkipPlan | None = None
    dtype: str | None = None
    alternatives: tuple[SkipPlan, ...] = ()  # other skip sets to choose among on the fly (DraftSelector)
    engine: str = "auto"  # how a lower-precision copy runs: "lean", "modules", or "auto" (lean where supported)
    lookup: int | None = None  # combined with prompt lookup of this n-gram length (PromptLookup)
    adapter: Any = None  # a trained draft's adapter (skiplm.speculative.trained.DraftAdapter), on the draft path only
    vocab: Any = None  # a reduced-vocabulary draft head (skiplm.speculative.vocab.DraftVocab); None: the whole vocabulary

    @classmethod
    def from_spec(cls, spec: str) -> Draft:
        """A full-depth draft from ``PRECISION[:ENGINE]`` (e.g. ``int8``, ``int8:modules``), named by the spec."""
        precision, _, engine = spec.partition(":")
        if engine and engine not in draft_engines():
            raise DataError(f"unknown draft engine {engine!r} in {spec!r}; use one of {', '.join(draft_engines())}.")
        return cls(spec, dtype=precision, engine=engine or "auto")

    @property
    def precision(self) -> str | None:
        """The draft's precision: ``dtype``, else the one its plan carries (None: the model's own weights)."""
        return self.dtype or draft_precision(self.plan)

    @property
    def search_seconds(self) -> float:
        """Time `skiplm draft-search` spent choosing this draft (0 for a draft given by hand)."""
        found = (self.plan.provenance or {}).get("draft_search", {}) if self.plan is not None else {}
        # a trained draft: its training counts too, unless the search that chose it trained it (then included)
        training = self.adapter.training_seconds if self.adapter is not None and not found.get("trained") else 0.0
        return float(found.get("seconds", 0.0)) + training

    def describe(self) -> str:
        engine = f" ({self.engine} engine)" if self.engine != "auto" else ""
        parts = [self.plan.describe() if self.plan is not None else "",
                 f"{self.precision} copy{engine}" if self.precision else "",
                 f"trained: {self.adapter.describe()}" if self.adapter is not None else "",
                 f"proposing {self.vocab.describe()}" if self.vocab is not None else "",
                 f"chosen on the fly among it and {len(self.alternatives)} other skip set(s) "
                 f"({'; '.join(a.describe() for a in self.alternatives)})" if self.alternatives else "",
                 f"combined with {self.lookup}-gram prompt lookup" if self.lookup else ""]
        return "; ".join(p for p in parts if p) or "full model"


def prompt_set(tokenizer, name: str, count: int, pydoc_tokens: int = 64) -> list[list[int]]:
    """``count`` prompts as token ids: a registered prompt set (``gsm8k``: questions in the chat template), or a
    registered corpus (``pydoc``) cut into chunks of ``pydoc_tokens`` tokens to continue."""
    if name in PROMPT_SETS:
        return encode_prompts(tokenizer, load_prompts(name, count), chat=True)
    if name in CORPORA:
        ids = tokenize_corpus(tokenizer, load_corpus(name), count * pydoc_tokens)
        return [ids[i * pydoc_tokens:(i + 1) * pydoc_tokens].tolist() for i in range(count)]
    known = dict.fromkeys(PROMPT_SETS.names() + CORPORA.names())
    raise DataError(f"unknown prompt set {name!r}; available: {', '.join(known)}.")


def bench_drafts(plans: Mapping[str, SkipPlan], precisions: Sequence[str] = (), *, adapt: bool = False,
                 lookup: int | None = None, adapters: Mapping[str, Any] | None = None,
                 vocabs: Sequence[Any] = (), plan_vocabs: Mapping[str, Any] | None = None) -> list[Draft]:
    """The drafts ``skiplm bench-speculative`` compares: one per named plan; with ``adapt``, each plan that records
    runner-up skip sets again as ``NAME-adapt``, its skip set chosen on the fly; one full-depth copy per
    ``PRECISION[:ENGINE]``; with ``lookup``, every draft again as ``NAME+lookup``, combined with prompt lookup.
    ``adapters``: by plan name, the trained adapter of a trained draft plan (:mod:`skiplm.speculative.trained`).
    ``plan_vocabs``: by plan name, the reduced draft vocabulary a draft plan records
    (:func:`~skiplm.speculative.vocab.resolve_draft_vocab`). ``vocabs`` (``--draft-vocab N,...``): every draft with a
    precision once per entry instead — a :class:`~skiplm.speculative.vocab.DraftVocab` as ``NAME-vN``, None as the
    draft over the whole vocabulary — so that the sizes are measured paired, in one run."""
    adapters, plan_vocabs = adapters or {}, plan_vocabs or {}
    drafts = [Draft(name, plan=plan, adapter=adapters.get(name), vocab=plan_vocabs.get(name))
              for name, plan in plans.items()]
    if adapt:
        adaptive = [dataclasses.replace(d, name=f"{d.name}-adapt", alternatives=alternatives)
                    for d in drafts if (alternatives := tuple(draft_alternatives(d.plan)))]
        if not adaptive:
            raise PlanError("--adapt needs a --draft-plan made by `skiplm draft-search --alternatives N` (N >= 1): "
                            "none of the plans given records runner-up skip sets.")
        drafts += adaptive
    drafts += [Draft.from_spec(spec) for spec in precisions]
    if vocabs:
        drafts = [variant for d in drafts for variant in (
            [dataclasses.replace(d, name=f"{d.name}-v{v.size}" if v is not None else d.name, vocab=v) for v in vocabs]
            if d.precision else [d])]
    if lookup:
        drafts += [dataclasses.replace(d, name=f"{d.name}+lookup", lookup=lookup) for d in drafts]
    return drafts


def run_speculative_bench(model: nn.Module, prompts: dict[str, list[list[int]]], drafts: Sequence[Draft], *,
                          batch_sizes: Sequence[int] = (1, 4, 8), new_tokens: int = 128, repeats: int = 1,
                          max_draft: int = DEFAULT_MAX_DRAFT, eos_token_id=None, pad_token_id: int = 0, fallback: bool = True,
                          warmup: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time plain greedy decoding and every draft on each prompt set and batch size (see the module docstring).
    ``fallback=False``: the drafts speculate all the way (what a draft itself is worth, without the monitor).
    ``warmup``: untimed generations first (the first prompt of the first set, plainly and by every draft), whose
    seconds are reported in ``"warmup"``, as is each draft's set-up (its copy made, quantized, compiled) in
    ``"setup_seconds"``; neither counts in a speedup."""
    if not drafts:
        raise DataError("give at least one draft: a plan (the layers it skips) and/or a dtype.")
    if repeats < 1 or new_tokens < 1 or not batch_sizes or min(batch_sizes) < 1 or warmup < 0:
        raise DataError("repeats, new tokens and batch sizes must be positive, warm-up rounds not negative.")
    decoders, setup = {}, {}
    for d in drafts:
        start = time.perf_counter()
        decoders[d.name] = _DraftRunner(model, d, fallback)
        setup[d.name] = time.perf_counter() - start
    results: dict[str, Any] = {}
    try:
        warmup_seconds = _warm_up(model, decoders, prompts, warmup, new_tokens, max_draft, eos_token_id,
                                  pad_token_id, progress)
        for set_name, encoded in prompts.items():
            for batch in batch_sizes:
                if len(encoded) < batch:
                    raise DataError(f"prompt set {set_name!r} has {len(encoded)} prompts; batch {batch} needs more.")
                groups = [encoded[i:i + batch] for i in range(0, len(encoded) - batch + 1, batch)]
                key = f"{set_name}_b{batch}"
                if progress:
                    progress(f"{set_name}, batch {batch}: {len(groups)} batch(es) x {repeats} round(s)")
                results[key] = _measure(model, decoders, groups, repeats, new_tokens, max_draft, eos_token_id,
                                        pad_token_id)
    finally:
        for decoder in decoders.values():
            decoder.close()
    overall = {}
    plain = sum(statistics.median(entry["plain"]["seconds"]) for entry in results.values())
    for d in drafts:  # the whole run, with the time spent searching for the draft counted against it
        spent = sum(statistics.median(entry[d.name]["seconds"]) for entry in results.values())
        overall[d.name] = {"plain_seconds": plain, "draft_seconds": spent, "search_seconds": d.search_seconds,
                           "speedup_with_search": plain / (spent + d.search_seconds)}
    return {"results": results, "drafts": {d.name: d.describe() for d in drafts}, "overall": overall,
            "setup_seconds": setup, "warmup": {"generations": warmup, "seconds": warmup_seconds}}


def _warm_up(model, decoders, prompts, generations, new_tokens, max_draft, eos_token_id, pad_token_id,
             progress) -> dict[str, float]:
    """``generations`` untimed generations of the first prompt of the first set, plainly and by every draft (a first
    call compiles, packs and allocates); returns the seconds each took in all."""
    seconds = {name: 0.0 for name in ["plain", *decoders]}
    if not generations or not prompts:
        return seconds
    ids, mask = left_pad(next(iter(prompts.values()))[:1], pad_token_id)
    if progress:
        progress(f"warm-up: {generations} generation(s) of {new_tokens} tokens each, plain and by every draft")
    for _ in range(generations):
        for name in seconds:
            start = time.perf_counter()
            if name == "plain":
                plain_generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id)
            else:
                decoders[name].generate(ids, mask, max_new_tokens=new_tokens, max_draft=max_draft,
                                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            seconds[name] += time.perf_counter() - start
    return seconds


class _DraftRunner:
    """One draft across the whole run: its adaptive draft length and fallback monitors (one per batch size) persist
    between generations."""

    def __init__(self, model: nn.Module, draft: Draft, fallback: bool = True):
        self.model, self.draft = model, draft
        self.length, self.fallback = AdaptiveDraftLength(), fallback
        self.monitors: dict[int, SpeedMonitor] = {}  # one per batch size, as a decoder keeps them
        self.selector = DraftSelector([draft.plan, *draft.alternatives]) if draft.alternatives else ()
        # a lower-precision copy is made once; a plan is applied to the shared model only while it drafts
        self.lookup = PromptLookup(draft.lookup) if draft.lookup else None  # what it learned carries over
        self.copy = (SpeculativeDecoder(model, draft.plan, draft_dtype=draft.precision, draft_length=self.length,
                                        alternatives=self.selector, draft_engine=draft.engine,
                                        prompt_lookup=self.lookup, draft_adapter=draft.adapter,
                                        draft_vocab=draft.vocab)
                     if draft.precision else None)

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, **options: Any) -> SpeculativeOutput:
        monitor = self.monitors.setdefault(ids.shape[0], SpeedMonitor()) if self.fallback else False
        if self.copy is not None:
            return self.copy.generate(ids, mask, fallback=monitor, **options)
        with SpeculativeDecoder(self.model, self.draft.plan, draft_length=self.length, alternatives=self.selector,
                                prompt_lookup=self.lookup, draft_adapter=self.draft.adapter) as decoder:
            return decoder.generate(ids, mask, fallback=monitor, **options)

    def close(self) -> None:
        if self.copy is not None:
            self.copy.close()


def _measure(model, decoders, groups, repeats, new_tokens, max_draft, eos_token_id, pad_token_id) -> dict[str, Any]:
    names = ["plain", *decoders]
    seconds = {name: [0.0] * repeats for name in names}
    tokens = dict.fromkeys(names, 0)
    stats = {name: [] for name in decoders}
    identical = dict.fromkeys(decoders, 0)
    rows = 0
    for round_index in range(repeats):
        for group_index, group in enumerate(groups):
            ids, mask = left_pad(group, pad_token_id)
            order = names if (round_index + group_index) % 2 == 0 else names[::-1]  # alternate who goes first
            outputs = {}
            for name in order:
                start = time.perf_counter()
                if name == "plain":
                    outputs[name] = plain_generate(model, ids, mask, max_new_tokens=new_tokens,
                                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)
                else:
                    result = decoders[name].generate(ids, mask, max_new_tokens=new_tokens, max_draft=max_draft,
                                                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)
                    outputs[name] = result.tokens
                    stats[name].append(result.stats)
                seconds[name][round_index] += time.perf_counter() - start
                if round_index == 0:
                    tokens[name] += sum(len(row) for row in outputs[name])
            for name in decoders:
                identical[name] += sum(a == b for a, b in zip(outputs[name], outputs["plain"]))
            rows += len(group) if round_index == 0 else 0
    plain_rate = tokens["plain"] / statistics.median(seconds["plain"])
    out: dict[str, Any] = {"rows": rows, "plain": {"seconds": seconds["plain"], "tokens": tokens["plain"],
                                                   "tokens_per_second": plain_rate}}
    for name in decoders:
        ratios = [p / s for p, s in zip(seconds["plain"], seconds[name])]
        out[name] = {
            "seconds": seconds[name], "tokens": tokens[name],
            "tokens_per_second": tokens[name] / statistics.median(seconds[name]),
            "speedup": statistics.median(ratios), "speedup_per_round": ratios,
            "identical_rows": identical[name], **_pooled(stats[name]),
        }
    return out


def _pooled(all_stats: list[SpeculativeStats]) -> dict[str, Any]:
    drafted = sum(s.drafted for s in all_stats)
    accepted = sum(s.accepted for s in all_stats)
    row_rounds = sum(s.row_rounds for s in all_stats)
    committed = sum(s.committed_from_draft for s in all_stats)
    return {
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_per_round": accepted / row_rounds if row_rounds else 0.0,
        "tokens_per_round": committed / row_rounds + 1 if row_rounds else 0.0,
        "rounds": sum(s.rounds for s in all_stats),
        "plain_steps": sum(s.plain_steps for s in all_stats),
        "fallbacks": sum(s.fallbacks for s in all_stats),
        "fallback_steps": sum(s.fallback_steps for s in all_stats),
        "draft_seconds": sum(s.draft_seconds for s in all_stats),
        "verify_seconds": sum(s.verify_seconds for s in all_stats),
        "draft_weight_mib": max((s.draft_weight_bytes for s in all_stats), default=0) / 2**20,
        "verify_weight_mib": max((s.verify_weight_bytes for s in all_stats), default=0) / 2**20,
        "draft_switches": sum(s.draft_switches for s in all_stats),
        "lookup_rounds": sum(s.lookup_rounds for s in all_stats),
        "lookup_committed": sum(s.lookup_committed for s in all_stats),
        "rounds_by_plan": [sum(c) for c in zip(*(s.rounds_by_plan for s in all_stats if s.rounds_by_plan))],
    }


def table_rows(result: dict[str, Any], settings: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per prompt set, batch size and draft: rates, speedup, acceptance, fallbacks, identical rows, memory."""
    headers = ["prompts", "batch", "draft", "plain tok/s", "draft tok/s", "speedup", "acceptance",
               "accepted / round", "tokens / round", "fallbacks (plain steps)", "lookup rounds (kept)",
               "identical rows", "extra MiB"]
    rows = []
    for key, entry in result["results"].items():
        set_name, batch = key.rsplit("_b", 1)
        for name in result["drafts"]:
            d = entry[name]
            rows.append([set_name, batch, name, f"{entry['plain']['tokens_per_second']:.1f}",
                         f"{d['tokens_per_second']:.1f}", f"{d['speedup']:.3f}x", f"{d['acceptance_rate']:.0%}",
                         f"{d['mean_accepted_per_round']:.2f}", f"{d['tokens_per_round']:.2f}",
                         f"{d['fallbacks']} ({d['fallback_steps']})",
                         f"{d.get('lookup_rounds', 0)} ({d.get('lookup_committed', 0)})",
                         f"{d['identical_rows']}/{entry['rows'] * settings['repeats']}",
                         f"{d['draft_weight_mib'] + d.get('verify_weight_mib', 0):.0f}"])
    return headers, rows


def markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    """The benchmark as a markdown page: settings, the drafts, one table row per prompt set, batch size and draft."""
    headers, rows = table_rows(result, settings)
    drafts = "\n".join(f"- `{name}`: {text}; whole run {result['overall'][name]['speedup_with_search']:.3f}x "
                       f"including {result['overall'][name]['search_seconds']:.1f} s of draft search"
                       for name, text in result["drafts"].items())
    return (f"# Self-speculative decoding vs plain greedy, {settings['model']}\n\n"
            f"{settings['machine']['cpu']}, {settings['machine']['torch_threads']} threads, torch "
            f"{settings['machine']['torch']}; {settings['new_tokens']} new tokens per row, greedy, max draft "
            f"{settings['max_draft']}; {settings['repeats']} round(s), every batch decoded plainly and by each draft "
            "in alternating order; speedup = plain time / draft time (median over rounds); the whole-run speedup "
            "counts the time `skiplm draft-search` took to choose a draft (0 for a draft given by hand). Identical "
            "rows: speculative output equal to plain greedy, token for token. Extra MiB: the draft's weights and the "
            "verifier's packed output head.\n\n"
            f"Drafts:\n{drafts}\n\n" + markdown_table(headers, rows) + "\n![speedups](speculative.png)\n")


def write_bench(out: str | Path, result: dict[str, Any], settings: dict[str, Any], title: str) -> str:
    """Write ``speculative.json``, ``.md`` and ``.png`` into ``out``; returns the markdown."""
    out = Path(out)
    write_json(out / "speculative.json", {"kind": "speculative-bench", "settings": settings, **result})
    text = markdown(result, settings)
    (out / "speculative.md").write_text(text)
    plot_speculative_speedups(result, out / "speculative.png", title)
    return text


__all__ = ["Draft", "bench_drafts", "markdown", "prompt_set", "run_speculative_bench", "table_rows", "write_bench"]
