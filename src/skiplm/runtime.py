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

import torch
from torch import nn
from transformers.cache_utils import Cache

from .adapters import count_layers, get_adapter, _get_path
from .errors import PlanError
from .plan import PARTS, SkipPlan

_HANDLE_ATTRIBUTE = "_skiplm_handle"
_NO_ATTRIBUTE = object()


class SkipState:
    """What the swapped forwards consult at call time: the plan, the current phase, and an on/off switch.

    One instance per application; nothing is global, so two models (or two views) can carry different plans.
    """

    def __init__(self, plan: SkipPlan):
        self.plan = plan
        self.phase = "prefill"
        self.enabled = True

    def skips(self, layer: int, part: str) -> bool:
        return self.enabled and self.plan.phase(self.phase).skips(layer, part)

    def skips_block(self, layer: int) -> bool:
        return self.skips(layer, "attention") and self.skips(layer, "mlp")


class Installed:
    """Forwards swapped and hooks added on a model, undone by :meth:`remove` (or at the end of a ``with`` block)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._restore: list[Callable[[], None]] = []

    def remove(self) -> None:
        """Restore every swapped forward and hook. Safe to call twice."""
        while self._restore:
            self._restore.pop()()
        if getattr(self.model, _HANDLE_ATTRIBUTE, None) is self:
            delattr(self.model, _HANDLE_ATTRIBUTE)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def _hook(self, handle) -> None:
        self._restore.append(handle.remove)

    def _swap(self, module: nn.Module, forward: Callable) -> None:
        previous = module.__dict__.get("forward", _NO_ATTRIBUTE)
        module.forward = forward

        def restore():
            if previous is _NO_ATTRIBUTE:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous

        self._restore.append(restore)


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (its forward runs once per model forward)."""
    path = get_adapter(model).layers
    return _get_path(model, path.rsplit(".", 1)[0]) if "." in path else model


class SkipHandle(Installed):
    """A plan applied to a model. Use as a context manager, or call :meth:`remove` when done."""

    def __init__(self, model: nn.Module, plan: SkipPlan):
        super().__init__(model)
        self.state = SkipState(plan)
        self._install()

    @property
    def plan(self) -> SkipPlan:
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
        try:
            self._hook(decoder_stack(self.model).register_forward_pre_hook(self._set_phase, with_kwargs=True))
            plan = self.plan
            for index, layer in enumerate(layers):
                skipped = {part: any(plan.phase(p).skips(index, part) for p in ("prefill", "decode")) for part in PARTS}
                if not any(skipped.values()):
                    continue
                attention, _ = adapter.branch_modules(layer, "attention")
                cache_index = getattr(attention, "layer_idx", index)
                if skipped["attention"] and skipped["mlp"]:
                    self._swap(layer, self._block_forward(layer.forward, index, cache_index))
                for part in PARTS:
                    if skipped[part]:
                        core, norms = adapter.branch_modules(layer, part)
                        self._swap(core, self._branch_forward(core.forward, index, part, cache_index, adapter.attention_outputs))
                        for norm in norms:
                            self._swap(norm, self._norm_forward(norm.forward, index, part))
        except BaseException:
            self.remove()
            raise

    def _set_phase(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = _cache_from(kwargs)
        self.state.phase = "decode" if cache is not None and cache.get_seq_length() > 0 else "prefill"

    # -- the swapped forwards ----------------------------------------------------------------------------------------
    def _block_forward(self, original: Callable, index: int, cache_index: int) -> Callable:
        state = self.state

        def forward(hidden_states, *args, **kwargs):
            if not state.skips_block(index):
                return original(hidden_states, *args, **kwargs)
            _advance_cache(_cache_from(kwargs), cache_index, hidden_states)
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
            _advance_cache(_cache_from(kwargs), cache_index, hidden_states)
            return (zero,) + (None,) * (outputs - 1)

        return forward

    def _norm_forward(self, original: Callable, index: int, part: str) -> Callable:
        state = self.state

        def forward(hidden_states, *args, **kwargs):
            if state.skips(index, part):
                return hidden_states
            return original(hidden_states, *args, **kwargs)

        return forward


def apply(model: nn.Module, plan, *, check_model: bool = True):
    """Apply ``plan`` to ``model`` until the returned handle is removed (or its ``with`` block ends).

    While applied, ``model(...)`` and ``model.generate(...)`` run with the plan: greedy or sampling, batched with
    padding, KV cache on. ``check_model=False`` skips the check that the plan was made for this model's weights.
    ``plan`` may also be an input-adaptive policy (:mod:`skiplm.policies`); it returns a
    :class:`~skiplm.policies.PolicyHandle` then.
    """
    from .policies import apply_policy, is_policy

    if is_policy(plan):
        return apply_policy(model, plan, check_model=check_model)
    if not isinstance(plan, SkipPlan):
        raise PlanError(f"apply() needs a SkipPlan or a policy, got {type(plan).__name__}; load one with "
                        "skiplm.policies.load_skipper(path).")
    if getattr(model, _HANDLE_ATTRIBUTE, None) is not None:
        raise PlanError(
            "this model already has a skip plan applied; remove it first (handle.remove() or leave its `with` block)."
        )
    if check_model:
        plan.check_model(model)
    elif plan.num_layers != count_layers(model):
        raise PlanError(f"the plan covers {plan.num_layers} layers but the model has a different number.")
    handle = SkipHandle(model, plan)
    setattr(model, _HANDLE_ATTRIBUTE, handle)
    return handle


def _cache_from(kwargs: dict) -> Cache | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, Cache) else None


def _advance_cache(cache: Cache | None, layer_index: int, hidden_states: torch.Tensor) -> None:
    """Grow cache slot ``layer_index`` by the current tokens without storing keys (see the module docstring)."""
    if cache is None:
        return
    batch, tokens = hidden_states.shape[:2]
    slot = cache.layers[layer_index] if layer_index < len(cache.layers) else None
    keys = getattr(slot, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() == 4:  # slot already has a layout: keep it
        heads, key_dim, value_dim = keys.shape[1], keys.shape[3], slot.values.shape[3]
    else:
        heads = key_dim = value_dim = 1
    placeholder_keys = hidden_states.new_zeros(batch, heads, tokens, key_dim)
    placeholder_values = placeholder_keys if value_dim == key_dim else hidden_states.new_zeros(batch, heads, tokens, value_dim)
    cache.update(placeholder_keys, placeholder_values, layer_index)
