"""Which plans a bridge can heal, the spans of skipped blocks it heals, and the kept weight each span's map folds into.

A *span* is a maximal run of consecutive skipped blocks ``start..end``. With ``h[l]`` the residual stream entering
layer ``l`` (``h[L]``: after the last layer), the full model carries ``h[start]`` to ``h[end + 1]`` through the span;
the pruned model passes ``h[start]`` on unchanged. The bridge maps one *linear* piece of ``h[start]`` by a d x d matrix
``T`` so the pruned stream after the span approximates the full model's ``h[end + 1]``. Which piece, so that ``T``
folds into a weight exactly:

* ``mlp-down`` (``start > 0``): layer ``k = start - 1`` runs, and ``h[start] = a + m`` where ``a`` is the stream after
  its attention branch and ``m = down_proj(z)`` its MLP's output (ReplaceMe). Mapping ``m`` only —
  ``a + m T`` — is exact algebra on the down projection: ``(z W^T + b) T = z (T^T W)^T + b T``, so
  ``W' = T^T W`` and ``b' = b T``. Checked on the calibration text: ``h[start] - a`` must equal ``down_proj``'s output
  (a family whose MLP output passes through another module first, e.g. a post-feedforward norm in Gemma 2/3 and OLMo 2,
  is refused: a map behind a norm does not fold into a weight).
* ``embedding`` (``start == 0``): nothing runs before the span, and ``h[0]`` is the embedding row (Gemma: times a
  constant), so ``h[0] T`` is the embedding of ``E' = E T``. Refused when the embedding is tied to the LM head (the
  head would change too).

Either way the healed model has exactly the pruned model's architecture, and ``T = I`` is the unhealed model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..errors import PlanError
from ..models.adapters import get_adapter


class HealError(PlanError):
    """A plan that cannot be healed this way, or a heal folder that is missing, damaged or of another version."""


@dataclasses.dataclass(frozen=True)
class Span:
    """Skipped blocks ``start..end`` (inclusive) and where their map folds: ``fold`` is ``"mlp-down"`` (the down
    projection of layer ``start - 1``) or ``"embedding"``; ``parameter`` names the weight (a state-dict key)."""

    start: int
    end: int
    fold: str
    parameter: str

    @property
    def name(self) -> str:
        """The tensor name of this span's map in ``bridge.safetensors``."""
        return f"span.{self.start}-{self.end}"

    @property
    def fold_layer(self) -> int | None:
        return self.start - 1 if self.fold == "mlp-down" else None

    def to_json(self) -> dict[str, Any]:
        return {"blocks": list(range(self.start, self.end + 1)), "fold": self.fold, "parameter": self.parameter,
                "tensor": self.name}


def check_block_plan(plan) -> list[tuple[int, int]]:
    """The spans (start, end) of a plan a bridge can heal: whole blocks only, the same in prefill and decode."""
    if getattr(plan, "input_adaptive", False):
        raise HealError("a bridge heals a static plan of whole blocks; an input-adaptive policy skips different layers "
                        "for every token. Make a block plan (skiplm plan --method block-influence, angular, ...).")
    if plan.is_empty():
        raise HealError("the plan skips nothing: there is nothing to heal. Make a plan that skips blocks.")
    if plan.prefill != plan.decode:
        raise HealError("a bridge changes weights, which serve prefill and decode alike: it needs a plan that skips the "
                        "same blocks in both (this one runs prefill differently; make it with --prefill same).")
    skips = plan.decode
    blocks = set(skips.blocks)
    partial = skips.half_blocks()
    if any(partial.values()):
        raise HealError(f"a bridge heals whole skipped blocks, and this plan skips single sublayers (attention "
                        f"{partial['attention']}, mlp {partial['mlp']}). Use a block plan (e.g. skiplm plan --method "
                        "block-influence or --method similarity --unit block).")
    spans, ordered = [], sorted(blocks)
    for layer in ordered:
        if spans and spans[-1][1] == layer - 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return [(start, end) for start, end in spans]


def down_projection(model: nn.Module, layer: int) -> tuple[str, nn.Linear]:
    """(module path, module) of the linear layer that writes layer ``layer``'s MLP output."""
    adapter = get_adapter(model)
    layer_module = adapter.decoder_layers(model)[layer]
    mlp, _ = adapter.branch_modules(layer_module, "mlp")
    hidden = model.get_input_embeddings().weight.shape[1]
    candidate = getattr(mlp, "down_proj", None)
    if not isinstance(candidate, nn.Linear):
        linears = [m for m in mlp.modules() if isinstance(m, nn.Linear) and m.out_features == hidden]
        candidate = linears[-1] if linears else None
    if not isinstance(candidate, nn.Linear) or candidate.out_features != hidden:
        raise HealError(f"the MLP of layer {layer} has no down projection (an nn.Linear to the hidden size, usually "
                        "`down_proj`) to fold a bridge into; this architecture cannot be bridged.")
    path = next(name for name, module in model.named_modules() if module is candidate)
    return path, candidate


def resolve_spans(model: nn.Module, plan) -> list[Span]:
    """The plan's spans with their fold targets on ``model``; refused with the reason where a fold is impossible."""
    spans = []
    for start, end in check_block_plan(plan):
        if start > 0:
            path, _ = down_projection(model, start - 1)
            spans.append(Span(start, end, "mlp-down", f"{path}.weight"))
            continue
        embedding = model.get_input_embeddings()
        output = model.get_output_embeddings()
        if output is not None and output.weight is embedding.weight:
            raise HealError(f"the plan skips blocks 0..{end}: no kept layer runs before them, so the bridge would fold "
                            "into the input embedding, which this model ties to its LM head (changing one changes "
                            "both). Keep block 0 in the plan.")
        path = next(name for name, module in model.named_modules() if module is embedding)
        spans.append(Span(start, end, "embedding", f"{path}.weight"))
    return spans


__all__ = ["HealError", "Span", "check_block_plan", "down_projection", "resolve_spans"]


def checked_plan(model: nn.Module, plan, what: str):
    """``plan`` for healing ``model``: a SkipPlan (``what`` names the method in the refusal), stamped with the
    model's identity if it has none, checked against the model, on a model that carries no skipper."""
    from ..plan import SkipPlan
    from ..planners.common import check_unplanned

    check_unplanned(model)
    if not isinstance(plan, SkipPlan):
        raise HealError(f"{what} a SkipPlan (skiplm plan), got {type(plan).__name__}.")
    plan = plan.for_model(model) if plan.model is None else plan
    plan.check_model(model)
    return plan

