"""What a speculative generation reports: :class:`SpeculativeStats` (the whole generation), :class:`RoundInfo` (one
round, for the ``on_round`` hook), :class:`SpeculativeOutput` (tokens, stats, texts), and :class:`SetupStats` (what a
decoder's one-time setup cost: the draft made or loaded, compiled, warmed up; the verifier's head packed)."""

from __future__ import annotations

import dataclasses
from typing import Any


DRAFT_SOURCES = ("built", "disk", "memory", "model")


@dataclasses.dataclass
class SetupStats:
    """What a :class:`~skiplm.speculative.SpeculativeDecoder`'s one-time setup cost, in seconds (wall clock), apart
    from decoding: paid once per decoder, before its first generation (a decoder kept for many generations pays it
    once). ``draft_source`` says where the draft's weights came from: ``"built"`` (computed from the model's weights
    now), ``"disk"`` (the draft cache, :mod:`skiplm.speculative.cache`), ``"memory"`` (an engine this process had
    built already) or ``"model"`` (the model's own weights: nothing to make)."""

    seconds: float = 0.0  # the whole setup
    draft_source: str = "model"
    key_seconds: float = 0.0  # fingerprinting the model's weights for the cache key
    load_seconds: float = 0.0  # reading the draft's weights from the cache
    copy_seconds: float = 0.0  # copying the model's modules (a modules draft), cast to the draft's dtype
    quantize_seconds: float = 0.0  # computing the draft's weights (quantizing, casting)
    pack_seconds: float = 0.0  # packing them for the device's kernels
    compile_seconds: float = 0.0  # compiling the lean engine (TorchScript)
    warmup_seconds: float = 0.0  # its first calls (TorchScript profiles and optimizes)
    store_seconds: float = 0.0  # writing the draft cache entry
    head_seconds: float = 0.0  # packing the verifier's output head
    background: bool = False  # the draft was built in a thread while plain steps decoded (seconds: until it was ready)
    cache_path: str | None = None  # the draft cache entry used or written
    cache_note: str | None = None  # why the cache was not used, or was rebuilt

    def record_engine(self, parts: dict[str, float], source: str) -> None:
        """Add a lean engine's :attr:`~skiplm.speculative.lean.LeanDraft.setup` parts."""
        self.draft_source = source
        self.quantize_seconds += parts.get("quantize", 0.0)
        self.pack_seconds += parts.get("pack", 0.0)
        self.compile_seconds += parts.get("compile", 0.0)
        self.warmup_seconds += parts.get("warmup", 0.0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        parts = [(name, getattr(self, f"{name}_seconds")) for name in
                 ("key", "load", "copy", "quantize", "pack", "compile", "warmup", "store", "head")]
        shown = ", ".join(f"{name.replace('warmup', 'warm-up')} {seconds:.2f}" for name, seconds in parts
                          if seconds >= 0.005)
        source = {"built": "built now", "disk": "from the draft cache", "memory": "built earlier in this process",
                  "model": "the model's own weights"}.get(self.draft_source, self.draft_source)
        built = "; built in the background while decoding plain steps" if self.background else ""
        text = f"setup {self.seconds:.2f} s (draft {source}" + (f"; {shown} s" if shown else "") + built + ")"
        if self.cache_note:
            text += f"; draft cache: {self.cache_note}"
        return text


@dataclasses.dataclass
class SpeculativeStats:
    """What happened during one generation. Counts of drafted / accepted tokens are summed over unfinished rows."""

    batch_size: int = 0
    new_tokens: int = 0  # tokens generated per row (before truncation at EOS)
    rounds: int = 0  # speculative rounds (draft + verify)
    row_rounds: int = 0  # sum over rounds of the unfinished rows
    drafted: int = 0
    accepted: int = 0  # drafts each row's verification accepted (before the batch minimum)
    committed_from_draft: int = 0  # drafts kept (after the batch minimum)
    discarded: int = 0  # accepted - committed_from_draft: drafts a row accepted but another row's rejection threw away
    plain_steps: int = 0  # single-token full-model steps (probe, fallback, or the last token)
    fallback_steps: int = 0  # plain steps taken because speculation did not pay
    building_steps: int = 0  # plain steps taken while the draft was being built in the background
    fallbacks: int = 0  # times speculation was switched off
    fallback_events: list[dict[str, float]] = dataclasses.field(default_factory=list)
    accepted_histogram: list[int] = dataclasses.field(default_factory=list)  # rounds by tokens committed from drafts
    prefill_seconds: float = 0.0  # the full model's prefill
    draft_prefill_seconds: float = 0.0  # the draft's (lazy) prefill
    draft_seconds: float = 0.0  # drafting, including feeding the draft tokens committed while it was off
    verify_seconds: float = 0.0  # the full model's verification passes
    plain_seconds: float = 0.0  # plain decoding steps
    total_seconds: float = 0.0
    draft_weight_bytes: int = 0  # extra weights the draft needs (0: it is the same model)
    draft_engine: str = "modules"  # "lean": skiplm's fused forward of a low-precision copy; "modules": the model's own
    verify_weight_bytes: int = 0  # the verifier's packed output head (0: none)
    draft_cache_bytes: int = 0  # the draft KV cache at the end of the generation
    final_threshold: float | None = None
    draft_switches: int = 0  # times the on-the-fly selection changed the draft's skip set
    lookup_rounds: int = 0  # rounds whose drafts came from prompt lookup (no draft forward)
    lookup_committed: int = 0  # tokens those rounds kept from the lookup, summed over rows
    rounds_by_plan: list[int] = dataclasses.field(default_factory=list)  # speculative rounds per candidate plan
    # the decoder's one-time setup, on the first generation after it was made (None after: already paid); it is not
    # in total_seconds, which times the generation only
    setup: SetupStats | None = None

    @property
    def setup_seconds(self) -> float:
        """The setup this generation paid (0 when the decoder's setup was paid by an earlier generation)."""
        return self.setup.seconds if self.setup is not None else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        """Drafts accepted per row and round (before the batch minimum)."""
        return self.accepted / self.row_rounds if self.row_rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens committed per row per speculative round (drafts kept + the verifier's own token)."""
        return (self.committed_from_draft / self.row_rounds + 1.0) if self.row_rounds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after prefill, all rows (the first token, from the prefill, excluded)."""
        seconds = self.total_seconds - self.prefill_seconds
        return self.batch_size * max(self.new_tokens - 1, 0) / seconds if seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(acceptance_rate=self.acceptance_rate, mean_accepted_per_round=self.mean_accepted_per_round,
                    tokens_per_round=self.tokens_per_round, decode_tokens_per_second=self.decode_tokens_per_second,
                    setup_seconds=self.setup_seconds)
        return data

    def describe(self) -> str:
        text = (f"{self.rounds} speculative rounds: {self.accepted}/{self.drafted} drafts accepted "
                f"({100 * self.acceptance_rate:.1f}%), {self.mean_accepted_per_round:.2f} accepted and "
                f"{self.tokens_per_round:.2f} tokens per round; {self.plain_steps} plain steps")
        if self.fallbacks:
            text += f" ({self.fallback_steps} after {self.fallbacks} fallback(s): speculation did not pay)"
        if self.building_steps:
            text += f" ({self.building_steps} while the draft was being built)"
        if self.discarded:
            text += f"; {self.discarded} accepted drafts discarded by the batch minimum"
        if self.lookup_rounds:
            text += f"; {self.lookup_rounds} rounds drafted by prompt lookup ({self.lookup_committed} tokens kept)"
        if len(self.rounds_by_plan) > 1:
            text += (f"; rounds per candidate draft plan {self.rounds_by_plan}, {self.draft_switches} switch(es)")
        text += (f"; draft {self.draft_seconds:.2f} s ({self.draft_engine} engine), verify {self.verify_seconds:.2f} s, "
                 f"plain {self.plain_seconds:.2f} s; draft weights {self.draft_weight_bytes / 2**20:.1f} MiB extra")
        if self.verify_weight_bytes:
            text += f", packed verifier head {self.verify_weight_bytes / 2**20:.1f} MiB"
        if self.setup is not None:
            text += f"; {self.setup.describe()}"
        return text


@dataclasses.dataclass(frozen=True)
class RoundInfo:
    """Passed to ``on_round`` after every speculative round (a hook for online draft adaptation)."""

    index: int
    drafted: int  # k
    accepted: tuple[int, ...]  # per unfinished row
    committed: float  # tokens an unfinished row committed, on average (accepted + 1)
    draft_seconds: float
    verify_seconds: float
    threshold: float | None
    drafter: str = "model"  # "model": the draft model drafted; "lookup": prompt lookup did


@dataclasses.dataclass
class SpeculativeOutput:
    tokens: list[list[int]]  # new tokens per row, ending at (and including) the first EOS
    stats: SpeculativeStats
    texts: list[str] | None = None  # decoded tokens, when a tokenizer was given


__all__ = ["DRAFT_SOURCES", "RoundInfo", "SetupStats", "SpeculativeOutput", "SpeculativeStats"]
