"""``bridge``: the training-free healing of ReplaceMe (Shopkhoev et al. 2025, arXiv 2505.02819) — one least-squares
linear map per span of skipped blocks, folded into a kept weight, so the healed model costs exactly what the pruned
one costs.

For a span ``start..end`` (see :mod:`skiplm.heal.spans` for the fold), on calibration text, with ``N`` token positions
and hidden size ``d``::

    M  [N, d]  the mapped piece of the pruned stream: the MLP output of layer start-1 (or the embedding, start == 0)
    A  [N, d]  the rest of the pruned stream after the span, passed on unchanged (the stream after layer start-1's
               attention; 0 for the embedding)
    H  [N, d]  the full model's stream after the span, h[end + 1]

    T = argmin ||A + M T - H||^2 + lam ||T - I||^2  =  (M^T M + lam I)^-1 (M^T (H - A) + lam I)

in float64, from the accumulated ``G = M^T M`` and ``C = M^T (H - A)`` (so memory is O(d^2), whatever ``N``). The
ridge pulls toward ``T = I`` — the unhealed model — not toward 0; ``lam = ridge * trace(G) / d``, scale-free.

``inputs="healed"`` (default): the spans are fitted in order, and ``M``, ``A`` of span s come from the model with the
spans before it already skipped and healed, so each map also corrects what the earlier cuts changed (one pass over
the calibration text per span). ``inputs="full"``: every span from the full model's stream (one pass in all).
``H`` always comes from the full model. ``skip_positions``: leading positions of each sequence left out of the fit.
Keep it 0: the first position's stream is the attention sink (on SmolLM2-135M ~99% of the squared norm after some
cuts); a map never fitted on it wrecks the sink and with it every later token's attention (held-out perplexity
62 -> 450+ on the default model, against 62 -> 93 / 24 -> 9.2 when it is fitted).

The fit reports the relative error ``||pred - H|| / ||H||`` per span on the calibration text, before (``T = I``)
and after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..analysis.activations import trace_residuals
from ..plan import SkipPlan, provenance
from ..planners.common import as_calibration
from ..registry import HEALERS, Option
from .artifact import BridgeStep, Healed
from .spans import HealError, Span, checked_plan, down_projection, resolve_spans

PAPER = "Shopkhoev et al. 2025, ReplaceMe: Network Simplification via Depth Pruning and Transformer Block Linearization (arXiv 2505.02819)"
_EXACT_FOLD_TOLERANCE = 2e-2  # |h[start] - (A + M)| / |h[start]|: rounding of the residual add, in any dtype


class _Normal:
    """The accumulated normal equations of one span's fit (float64)."""

    def __init__(self, d: int):
        self.gram = torch.zeros(d, d, dtype=torch.float64)  # M^T M
        self.cross = torch.zeros(d, d, dtype=torch.float64)  # M^T (H - A)
        self.rr = 0.0  # ||H - A||^2
        self.before = 0.0  # ||A + M - H||^2, the unhealed error
        self.target = 0.0  # ||H||^2
        self.tokens = 0

    def add(self, m: torch.Tensor, a: torch.Tensor | None, h: torch.Tensor) -> None:
        m, h = m.to(torch.float64), h.to(torch.float64)  # [n, d]
        r = h if a is None else h - a.to(torch.float64)
        self.gram += m.T @ m
        self.cross += m.T @ r
        self.rr += float((r * r).sum())
        self.before += float(((m - r) ** 2).sum())
        self.target += float((h * h).sum())
        self.tokens += m.shape[0]

    def solve(self, ridge: float, span: Span) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.gram.shape[0]
        eye = torch.eye(d, dtype=torch.float64)
        lam = ridge * float(torch.diagonal(self.gram).sum()) / d
        try:
            t = torch.linalg.solve(self.gram + lam * eye, self.cross + lam * eye)  # [d, d]
        except RuntimeError:
            raise HealError(f"the least-squares fit of blocks {span.start}..{span.end} is singular: use more "
                            "calibration tokens or a larger ridge (--option ridge=1e-3).") from None
        # ||M T - R||^2 = tr(T^T G T) - 2 tr(T^T C) + ||R||^2
        after = float((t * (self.gram @ t)).sum() - 2 * (t * self.cross).sum()) + self.rr
        scale = max(self.target, 1e-300)
        return t, {"residual_before": round((self.before / scale) ** 0.5, 6),
                   "residual_after": round((max(after, 0.0) / scale) ** 0.5, 6), "tokens": self.tokens}


def _trace_span_io(model: nn.Module, batch: torch.Tensor, spans: Sequence[Span], skip_positions: int):
    """Per span: (M, A, h[start]) [n, d] each on this batch, from ``model`` as it is (plan applied or not), and the
    whole trace (for targets)."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for span in spans:
        if span.fold == "mlp-down":
            _, module = down_projection(model, span.fold_layer)
            store = captured.setdefault(span.fold_layer, [])
            handles.append(module.register_forward_hook(
                lambda mod, args, out, store=store: store.append(out.detach().reshape(-1, out.shape[-1]).float().cpu())))
    try:
        trace = trace_residuals(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    keep = _kept_positions(batch, skip_positions)
    io = []
    for span in spans:
        if span.fold == "mlp-down":
            m = torch.cat(captured[span.fold_layer])
            a = trace.mid[span.fold_layer]
            stream = trace.block_in[span.start]
            error = float((stream - (a + m)).norm()) / max(float(stream.norm()), 1e-30)
            if error > _EXACT_FOLD_TOLERANCE:
                raise HealError(
                    f"layer {span.fold_layer}'s MLP output reaches the residual stream through another module after "
                    f"its down projection (relative difference {error:.3g}; e.g. a post-feedforward norm, as in Gemma "
                    "2/3 and OLMo 2), so a bridge map cannot be folded into a weight exactly. This family cannot be "
                    "bridged; skip other blocks or heal by training (coming).")
            io.append((m[keep], a[keep]))
        else:
            io.append((trace.block_in[0][keep], None))
    return io, trace, keep


def _kept_positions(batch: torch.Tensor, skip_positions: int) -> torch.Tensor:
    batch_size, length = batch.shape
    positions = torch.arange(length).repeat(batch_size)  # flattened (batch, position) order of the trace
    return positions >= skip_positions


def fit_bridge(
    model: nn.Module,
    plan: SkipPlan,
    *,
    calibration: Any = None,
    ridge: float = 0.1,
    inputs: str = "healed",
    skip_positions: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Healed:
    """Heal ``plan`` (whole blocks, the same in prefill and decode) on ``model`` with one folded linear map per span of
    skipped blocks, fitted on ``calibration`` ([1, T] token-id batches, e.g. ``skiplm.load_calibration(tokenizer,
    "gsm8k", 16, 256)``). ``progress(done, total)`` counts calibration batches traced. Returns a :class:`Healed`
    (apply it with ``skiplm.apply(model, healed)``, save it with ``healed.save(folder)``). ``model`` is unchanged."""
    start_time = time.perf_counter()
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise HealError(f"the bridge's ridge must be a number >= 0, got {ridge!r}.")
    if inputs not in ("healed", "full"):
        raise HealError(f"the bridge's inputs must be 'healed' or 'full', got {inputs!r}.")
    if isinstance(skip_positions, bool) or not isinstance(skip_positions, int) or skip_positions < 0:
        raise HealError(f"skip_positions must be an integer >= 0, got {skip_positions!r}.")
    plan = checked_plan(model, plan, "a bridge heals")
    spans = resolve_spans(model, plan)
    batches = as_calibration(calibration, model, "bridge", min_length=skip_positions + 1)
    d = model.get_input_embeddings().weight.shape[1]
    passes = len(batches) * (len(spans) if inputs == "healed" else 1)
    done = 0

    def step():
        nonlocal done
        done += 1
        if progress:
            progress(done, passes)

    # pass 1, the full model: targets h[end + 1] of every span, and the inputs of every span ("full") or the first
    normals = [_Normal(d) for _ in spans]
    targets: list[list[torch.Tensor]] = [[] for _ in spans]
    first = spans if inputs == "full" else spans[:1]
    for batch in batches:
        io, trace, keep = _trace_span_io(model, batch, first, skip_positions)
        for index, span in enumerate(spans):
            h = trace.block_in[span.end + 1][keep]
            if index < len(first):
                normals[index].add(io[index][0], io[index][1], h)
            else:
                targets[index].append(h)
        step()
    maps: dict[str, torch.Tensor] = {}
    fit: list[dict[str, float]] = [{} for _ in spans]
    if inputs == "full":
        for index, span in enumerate(spans):
            t, fit[index] = normals[index].solve(ridge, span)
            maps[span.name] = t.float()
    else:
        t, fit[0] = normals[0].solve(ridge, spans[0])
        maps[spans[0].name] = t.float()
        for index in range(1, len(spans)):  # the model with spans 0..index-1 skipped and healed
            span = spans[index]
            partial = _partial(plan, spans[:index], maps)
            with partial.install(model, check_model=False):
                for batch, h in zip(batches, targets[index]):
                    io, _, _ = _trace_span_io(model, batch, [span], skip_positions)
                    normals[index].add(io[0][0], io[0][1], h)
                    step()
            targets[index] = []
            t, fit[index] = normals[index].solve(ridge, span)
            maps[span.name] = t.float()
    seconds = time.perf_counter() - start_time
    record = provenance("bridge", paper=PAPER, plan_method=plan.provenance.get("method"),
                        calibration=batches.describe(), options={"ridge": ridge, "inputs": inputs,
                                                                 "skip_positions": skip_positions},
                        seconds=round(seconds, 3))
    return Healed(plan, [BridgeStep(spans, maps, fit)], provenance=record)


def _partial(plan: SkipPlan, spans: Sequence[Span], maps: dict[str, torch.Tensor]) -> Healed:
    blocks = [layer for span in spans for layer in range(span.start, span.end + 1)]
    sub = SkipPlan.from_layers(plan.num_layers, blocks=blocks, model=plan.model)
    return Healed(sub, [BridgeStep(list(spans), {span.name: maps[span.name] for span in spans})])


HEALERS.register(
    "bridge",
    paper=PAPER,
    needs={"calibration"},
    calibration=(16, 256),
    summary="one least-squares linear map per span of skipped blocks, folded into the down projection before it",
    options=(
        Option("ridge", float, 0.1, "ridge toward the identity map (the unhealed model), times mean diag(M^T M)"),
        Option("inputs", str, "healed", "fit each span on the stream of the model with the earlier spans healed "
                                        "('healed') or on the full model's stream ('full')", ("healed", "full")),
        Option("skip_positions", int, 0, "leading positions of each calibration sequence left out of the fit (keep 0: "
                                         "the first is the attention sink)"),
    ),
    extra={"blocks_only": True},
)(fit_bridge)

__all__ = ["PAPER", "fit_bridge"]
