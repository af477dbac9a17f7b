"""The skip runtime: apply a SkipPlan to a live Hugging Face model, scoped and reversible.

How a skip is executed (no modeling file is copied; only instance ``forward`` attributes are swapped, so parameters,
state-dict keys and module hooks stay as they are):

* a skipped **block** (attention and MLP) — the decoder layer's forward returns its input: ``h = h``. Nothing runs.
* a skipped **attention** branch — the attention module returns a 0-dim zero and its branch norms become identities,
  so the layer computes ``h = h + 0``: one add, no projections, no attention.
* a skipped **MLP** branch — likewise ``h = h + 0``.

KV-cache rule. A skipped attention writes no keys or values. transformers reads the sequence length and mask sizes
from *some* cache layer (layer 0, the first full-attention layer, ...), so a skipped layer still advances its cache
slot's length with a placeholder: a ``[batch, 1, tokens, 1]`` zero tensor (one float per token) when the slot holds
nothing real, or zeros of the slot's own shape when an earlier forward stored real keys there. Placeholders are never
read: attention at that layer stays skipped for the rest of the sequence, because a plan may not run in decode an
attention that prefill skipped (checked by :class:`~skiplm.plan.SkipPlan`).

Phases. A forward over an empty (or absent) cache is ``prefill``; a forward that extends a non-empty cache is
``decode``. The phase is decided once per forward, by a pre-hook on the module that owns the decoder layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from ..models.adapters import PARTS, get_adapter
from .hooks import Installed, advance_cache, cache_from, decoder_stack, install_handle, phase_of


class SkipState:
    """What the swapped forwards consult at call time: the plan (a :class:`~skiplm.plan.SkipPlan`; this module does
    not import it, :mod:`skiplm.plan` imports this one), the current phase, and an on/off switch.

    One instance per application; nothing is global, so two models (or two views) can carry different plans.
    """

    def __init__(self, plan):
        self.plan = plan
        self.phase = "prefill"
        self.enabled = True

    def skips(self, layer: int, part: str) -> bool:
        return self.enabled and self.plan.phase(self.phase).skips(layer, part)

    def skips_block(self, layer: int) -> bool:
        return self.skips(layer, "attention") and self.skips(layer, "mlp")


class SkipHandle(Installed):
    """A plan applied to a model. Use as a context manager, or call :meth:`remove` when done."""

    def __init__(self, model: nn.Module, plan):
        self.state = SkipState(plan)
        super().__init__(model)  # swaps the forwards (_install)

    @property
    def plan(self):
        return self.state.plan

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the full model inside this block (e.g. to verify drafted tokens), the plan outside it."""
        previous, self.state.enabled = self.state.enabled, False
        try:
            yield
        finally:
            self.state.enabled = previous

    # -- installation ----------------------------------------------------------------------------------------------
    def _install(self) -> None:
        adapter = get_adapter(self.model)
        layers = adapter.decoder_layers(self.model)
        self.hook(decoder_stack(self.model).register_forward_pre_hook(self._set_phase, with_kwargs=True))
        plan = self.plan
        for index, layer in enumerate(layers):
            # a sublayer skipped in either phase gets a swapped forward; SkipState says per forward whether it skips
            skipped = {part: any(plan.phase(p).skips(index, part) for p in ("prefill", "decode")) for part in PARTS}
            if not any(skipped.values()):
                continue
            attention, _ = adapter.branch_modules(layer, "attention")
            cache_index = getattr(attention, "layer_idx", index)
            if skipped["attention"] and skipped["mlp"]:
                self.swap(layer, self._block_forward(layer.forward, index, cache_index))
            for part in PARTS:
                if skipped[part]:
                    core, norms = adapter.branch_modules(layer, part)
                    self.swap(core, self._branch_forward(core.forward, index, part, cache_index,
                                                         adapter.attention_outputs))
                    for norm in norms:
                        self.swap(norm, self._norm_forward(norm.forward, index, part))

    def _set_phase(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.state.phase = phase_of(kwargs)

    # -- the swapped forwards ----------------------------------------------------------------------------------------
    def _block_forward(self, original: Callable, index: int, cache_index: int) -> Callable:
        state = self.state

        def forward(hidden_states, *args, **kwargs):
            if not state.skips_block(index):
                return original(hidden_states, *args, **kwargs)
            advance_cache(cache_from(kwargs), cache_index, hidden_states)
            return hidden_states

        return forward

    def _branch_forward(self, original: Callable, index: int, part: str, cache_index: int, outputs: int) -> Callable:
        state = self.state

        def forward(*args, **kwargs):
            if not state.skips(index, part):
                return original(*args, **kwargs)
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            zero = hidden_states.new_zeros(())  # broadcasts in the residual add: h + 0
            if part == "mlp":
                return zero
            advance_cache(cache_from(kwargs), cache_index, hidden_states)
            return (zero,) + (None,) * (outputs - 1)

        return forward

    def _norm_forward(self, original: Callable, index: int, part: str) -> Callable:
        state = self.state

        def forward(hidden_states, *args, **kwargs):
            if state.skips(index, part):
                return hidden_states
            return original(hidden_states, *args, **kwargs)

        return forward


def install_plan(model: nn.Module, plan, *, check_model: bool = True) -> SkipHandle:
    """Install a static plan (what :meth:`skiplm.plan.SkipPlan.install` does): check the model, swap the forwards,
    and record the handle on the model."""
    return install_handle(plan, model, lambda: SkipHandle(model, plan), check_model=check_model, what="plan")
