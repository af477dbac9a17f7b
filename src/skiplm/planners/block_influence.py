"""ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect").

Block Influence of layer l is 1 - cos(block input, block output), averaged over calibration tokens
(:func:`skiplm.analysis.metrics.block_influence`); the blocks with the lowest influence are removed, ranked once on the full
model. Layer protection: none — as in the paper, any block may go, first and last included; the metric itself keeps
them in practice (they change the representation most). A plan keeps at least one block.
"""

from __future__ import annotations

from torch import nn

from ..analysis.metrics import block_influence
from ..plan import SkipPlan
from ..registry import PLANNERS
from .common import Planning, Progress, prefixes, rounded, trace


@PLANNERS.register("block-influence", paper="Men et al. 2024, ShortGPT (Block Influence)", needs={"calibration"},
                   calibration=(8, 256), summary="the blocks of lowest Block Influence (1 - cos(in, out)), ranked once")
def plan_block_influence(model: nn.Module, *, speedup: float | None = None, skip: int | None = None,
                         prefill: str = "same", name: str | None = None, calibration=None,
                         progress: Progress | None = None) -> SkipPlan:
    """Skip the ``skip`` blocks of lowest Block Influence, or as many as an ideal ``speedup`` needs.

    ``calibration``: [1, T] token-id batches (:func:`skiplm.planners.load_calibration`).
    """
    job = Planning.start(model, "block-influence", speedup=speedup, skip=skip, prefill=prefill, name=name,
                         calibration=calibration, progress=progress)
    num_layers = job.num_layers
    scores = []

    def sequence():  # runs only once select() has checked that the target is in reach
        scores.extend(block_influence(trace(model, job.batches)).tolist())
        if progress:
            progress(1, 1)
        yield from prefixes([("block", layer) for layer in sorted(range(num_layers), key=lambda l: (scores[l], l))])

    units = job.select(sequence(), pool=[("block", layer) for layer in range(num_layers)], limit=num_layers - 1,
                       what="blocks but one (a plan keeps at least one)")
    return job.plan(units, protection="none: any block may be removed, as in the paper",
                    order=[layer for _, layer in units], scores={"block_influence": rounded(scores)})
