"""The hook machinery every skipper uses: swapped instance forwards and module hooks, undone on ``remove()``; the one
handle a model may carry at a time (:func:`install_handle`); the phase of a forward; and cache placeholders for
skipped attention.

Nothing here knows what a plan or a policy is: :mod:`skiplm.runtime.static` (plans) and
:mod:`skiplm.policies.runtime` (policies) build on these pieces, and so do the trained skippers to come. A skipper's
``install`` is one call::

    def install(self, model, *, check_model=True):
        return install_handle(self, model, lambda: MyHandle(model, self), check_model=check_model, what="my skipper")
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..errors import PlanError
from ..models.adapters import _get_path, count_layers, get_adapter

HANDLE_ATTRIBUTE = "_skiplm_handle"  # the model attribute that holds the installed skipper's handle
_NO_ATTRIBUTE = object()


class Installed:
    """Forwards swapped and hooks added on a model, undone by :meth:`remove` (or at the end of a ``with`` block).

    A subclass sets what its forwards read, then calls ``super().__init__(model)``, which runs its :meth:`_install`
    (swapping forwards with :meth:`swap`, adding hooks with :meth:`hook`) and undoes everything if that fails part-way.
    """

    # What the skipper skipped while installed, for skippers whose skips depend on the input (a policy's
    # PolicyStats, with ``to_json()``); None where what runs is fixed in advance (a plan says it).
    stats = None

    def __init__(self, model: nn.Module):
        self.model = model
        self._restore: list[Callable[[], None]] = []
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    def _install(self) -> None:
        """Swap the forwards and add the hooks this skipper needs."""

    def remove(self) -> None:
        """Restore every swapped forward and hook. Safe to call twice."""
        while self._restore:
            self._restore.pop()()
        if getattr(self.model, HANDLE_ATTRIBUTE, None) is self:
            delattr(self.model, HANDLE_ATTRIBUTE)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) reaches the handle through the model's attribute. A copy cannot carry it: the swapped
        # forwards are closures over the original's modules (the copy would run the original's weights) and the
        # copied handle's remove() would restore the original. Refused, before anything is copied.
        raise PlanError("cannot copy a model while a skip plan or policy is applied to it: copy it first and apply "
                        "the plan to the copy, or remove the plan (handle.remove()) before copying.")

    def hook(self, handle) -> None:
        """Keep a torch hook handle (``register_forward_pre_hook(...)``) to remove with the rest."""
        self._restore.append(handle.remove)

    def swap(self, module: nn.Module, forward: Callable) -> None:
        """Give ``module`` an instance ``forward``; the previous one (or none) comes back on :meth:`remove`."""
        previous = module.__dict__.get("forward", _NO_ATTRIBUTE)
        module.forward = forward

        def restore():
            if previous is _NO_ATTRIBUTE:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous

        self._restore.append(restore)


def installed_handle(model: nn.Module) -> Installed | None:
    """The handle of the skipper installed on ``model``, if any."""
    return getattr(model, HANDLE_ATTRIBUTE, None)


def check_free(model: nn.Module) -> None:
    """Refuse a second skipper on a model that already carries one."""
    if installed_handle(model) is not None:
        raise PlanError("this model already has a skip plan applied (or a policy); remove it first (handle.remove() "
                        "or leave its `with` block).")


def check_layers(skipper, model: nn.Module, check_model: bool, what: str) -> None:
    """The model check every skipper runs before installing: its identity (``check_model``) or at least its depth."""
    if check_model:
        skipper.check_model(model)
    elif skipper.num_layers != count_layers(model):
        raise PlanError(f"the {what} covers {skipper.num_layers} layers but the model has a different number "
                         f"({count_layers(model)}).")


def attach(model: nn.Module, handle: Installed) -> Installed:
    """Record ``handle`` as the model's installed skipper (removed with the handle)."""
    setattr(model, HANDLE_ATTRIBUTE, handle)
    return handle


def install_handle(skipper, model: nn.Module, make_handle: Callable[[], Installed], *, check_model: bool,
                   what: str) -> Installed:
    """What every skipper's ``install`` does: refuse a model that already carries one, check the model (``what``
    names the skipper in errors: "plan", "policy"), build the handle and record it on the model."""
    check_free(model)
    check_layers(skipper, model, check_model, what)
    return attach(model, make_handle())


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (its forward runs once per model forward)."""
    path = get_adapter(model).layers
    return _get_path(model, path.rsplit(".", 1)[0]) if "." in path else model


def cache_from(kwargs: dict) -> Cache | None:
    """The KV cache a forward was given, under either of transformers' keyword names."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, Cache) else None


def phase_of(kwargs: dict) -> str:
    """``decode`` for a forward that extends a non-empty cache, else ``prefill``."""
    cache = cache_from(kwargs)
    return "decode" if cache is not None and cache.get_seq_length() > 0 else "prefill"


def advance_cache(cache: Cache | None, layer_index: int, hidden_states: torch.Tensor) -> None:
    """Grow cache slot ``layer_index`` by the current tokens without storing keys (see :mod:`skiplm.runtime.static`)."""
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
