"""The runtime of LoRA-Drop: :class:`LoraDropHandle` (the swapped forwards of the droppable decoder layers and the
per-forward schedule, built on :mod:`skiplm.runtime.hooks`), :class:`Correction` (the rank-r correction) and
:class:`LoraDropStats` (what was dropped).

What a droppable layer ``l`` computes for a token at position ``t`` (``h_in`` its input, the residual stream entering
the layer; ``h_out`` its output)::

    anchor token:      h_out(t) = layer_l(h_in(t))                       (the full layer; see the KV rule below)
    dropped token:     h_out(t) = h_in(t) + u_l(a) + B_l A_l n(h_in(t))

where ``a`` is the token's anchor (the latest anchor at or before ``t`` in its row), ``u_l(a) = h_out(a) - h_in(a)``
is the anchor's *residual update* at layer ``l`` (what the layer added to the residual stream for the anchor token),
``n(x) = x / sqrt(mean(x^2) + 1e-6)`` a parameter-free RMS normalisation of the current input, and ``A_l`` [r, d],
``B_l`` [d, r] the correction (``B`` zero-initialised: an untrained correction adds exactly nothing). The layers that
are not droppable (layer 0, every 4th: the paper's rule) run in full for every token.

KV-cache rule. A dropped token writes **no** keys or values at a droppable layer; at those layers the cache holds
only the prompt (prefill) positions and the anchor positions, and every later token that runs the layer (an anchor)
attends to exactly those positions — the sliced attention mask (``mask[..., kept]``) says which. At the layers that
are not droppable every token writes and reads as in the full model. Layer 0 is never droppable, so the cache's
length (read from layer 0 by transformers) and the masks it builds stay those of the whole sequence.

Schedule. Generation (``forced_prompt=None``): the prefill runs in full (every prompt token is an anchor); decode
step ``s`` (0 for the first forward after the prefill) is an anchor when ``(s + 1) % K == 0``, the same step for
every row of a batch, so a left-padded batch drops the same steps as each of its rows alone. Scoring text in one
forward (``forced_prompt=n``, :meth:`~skiplm.lora_drop.LoraDrop.teacher_forced` uses 1): a token at real position
``p`` (left padding not counted) is an anchor when ``p < n`` or ``(p - n + 1) % K == 0`` — what a prefill of ``n``
tokens followed by step-by-step decoding does. Such a forward computes every token through every layer, attention at
droppable layers masked to anchor keys, then takes the anchors' outputs and rebuilds the dropped tokens' outputs from
their anchor's update and the correction: the numbers of step-by-step decoding, in one forward (and differentiable:
this is what trains the corrections). A cache it fills holds only the anchors at droppable layers, so decoding can
continue from it when every row has the same real positions.

Not supported: several tokens per forward after the prefill (speculative verification, chunked prefill), cache
reordering (beam search), sliding-window layers among the droppable ones, attention implementations other than
``eager`` and ``sdpa``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..measure.costs import CostModel
from ..models.adapters import get_adapter
from ..plan import PHASES
from ..runtime.hooks import Installed, cache_from, decoder_stack

CHILD = "lora_drop"  # the child module a droppable layer carries while installed (its correction)
EPS = 1e-6


class LoraDropError(PlanError):
    """A LoRA-Drop skipper is malformed, or asked to run where its schedule cannot be kept exactly."""


class Correction(nn.Module):
    """``B A n(x)``: the rank-r correction of a dropped token's output from its own input. ``down`` is ``A``
    [r, d], ``up`` is ``B`` [d, r]; ``x`` [..., d] -> [..., d]."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        rank, hidden = down.shape
        self.down = nn.Linear(hidden, rank, bias=False, device=down.device, dtype=down.dtype)
        self.up = nn.Linear(rank, hidden, bias=False, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        return self.up(self.down(normalised))


@dataclasses.dataclass
class LoraDropStats:
    """Per phase: tokens seen, anchors among them, and layer computations dropped (of ``layers`` per token).
    ``cost``: the parameters a token computes with in the full model (layers and head); ``dropped_cost``: those a
    dropped token leaves out (the droppable layers'); both from parameter counts, for the ideal speedup."""

    layers: int
    droppable: int
    cost: int = 0
    dropped_cost: int = 0
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    anchors: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    dropped_tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def count(self, phase: str, tokens: int, anchors: int, dropped_tokens: int) -> None:
        self.tokens[phase] += tokens
        self.anchors[phase] += anchors
        self.dropped_tokens[phase] += dropped_tokens

    def to_json(self) -> dict[str, Any]:
        """Per phase seen: ``layer_drop_ratio`` (dropped layer computations / all), ``dropped_layers_per_token``,
        ``anchor_share``, ``ideal_speedup`` (full compute over compute kept); and, under the names the policy
        reports use (a dropped layer skips its MLP and its attention), ``mlp_skip_ratio``, ``skipped_mlps_per_token``
        and ``attention_skip_ratio``."""
        out = {}
        for phase in PHASES:
            tokens = self.tokens[phase]
            if not tokens:
                continue
            per_token = self.dropped_tokens[phase] * self.droppable / tokens
            ratio = per_token / self.layers
            out[phase] = {"tokens": tokens, "layer_drop_ratio": ratio, "dropped_layers_per_token": per_token,
                          "anchor_share": self.anchors[phase] / tokens, "mlp_skip_ratio": ratio,
                          "skipped_mlps_per_token": per_token, "attention_skip_ratio": ratio}
            if self.cost:
                kept = tokens * self.cost - self.dropped_tokens[phase] * self.dropped_cost
                out[phase]["ideal_speedup"] = tokens * self.cost / kept
        return out


def check_supported(model: nn.Module, droppable: tuple[int, ...]) -> None:
    """Refuse a model whose attention LoRA-Drop cannot mask exactly (sliding windows at a droppable layer, an
    attention implementation other than eager / sdpa)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("eager", "sdpa"):
        raise LoraDropError(f"LoRA-Drop masks attention itself and supports the eager and sdpa implementations; this "
                            f"model uses {implementation!r}. Load it with attn_implementation='sdpa'.")
    types = getattr(config, "layer_types", None)
    sliding = [i for i in droppable if types is not None and i < len(types) and types[i] != "full_attention"]
    if types is None and getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        sliding = list(droppable)
    if sliding:
        raise LoraDropError(f"layers {sliding} use sliding-window attention: a dropped token writes no keys there, so "
                            "the window would no longer cover the positions it should. LoRA-Drop needs full-attention "
                            "droppable layers; choose others (droppable=...).")


class LoraDropHandle(Installed):
    """A LoRA-Drop skipper applied to a model: the droppable layers' forwards swapped, their corrections attached as
    a ``lora_drop`` child (named parameters while installed, so they train), and a pre-hook on the decoder stack that
    decides each forward's schedule. ``dry_run``: decide and count, drop nothing (every layer runs, every token writes
    its keys). Use as a context manager, or call :meth:`remove`."""

    def __init__(self, model: nn.Module, skipper, *, dry_run: bool = False):
        self.skipper = skipper
        self.dry_run = dry_run
        self.stats = LoraDropStats(skipper.num_layers, len(skipper.droppable))
        self.enabled = True
        self.kind = "off"  # this forward: off, full, anchor, drop, schedule
        self.delta: dict[int, torch.Tensor] = {}  # per droppable layer: the last anchor's update, [batch, 1, d]
        self.kept: torch.Tensor | None = None  # cache columns the droppable layers hold (prefill + anchors)
        self.step = 0  # decode steps since the prefill
        self.expected: int | None = None  # the cache length the next decode forward must find
        self.continuable = False
        self._anchor: torch.Tensor | None = None  # schedule forward: [batch, tokens] bool
        self._source: torch.Tensor | None = None  # schedule forward: [batch, tokens] index of each token's anchor
        self._masks: dict[int, Any] = {}  # this forward's masks, by id of the mask transformers built
        self.corrections: dict[int, Correction] = {}
        super().__init__(model)

    # -- installation ------------------------------------------------------------------------------------------------
    def _install(self) -> None:
        adapter = get_adapter(self.model)
        layers = adapter.decoder_layers(self.model)
        check_supported(self.model, self.skipper.droppable)
        costs = CostModel.from_parameter_counts(self.model)
        self.stats.cost = costs.total
        self.stats.dropped_cost = sum(costs.attention[i] + costs.mlp[i] for i in self.skipper.droppable)
        self.hook(decoder_stack(self.model).register_forward_pre_hook(self._begin, with_kwargs=True))
        for index in self.skipper.droppable:
            layer = layers[index]
            attention, _ = adapter.branch_modules(layer, "attention")
            cache_index = getattr(attention, "layer_idx", index)
            weights = (self.skipper.corrections or {}).get(index)
            if weights is not None:
                if hasattr(layer, CHILD):
                    raise LoraDropError(f"decoder layer {index} already has a {CHILD!r} attribute.")
                reference = next(layer.parameters())
                down, up = (w.to(device=reference.device, dtype=reference.dtype) for w in weights)
                hidden = getattr(self.model.config, "hidden_size", down.shape[1])
                if down.shape[1] != hidden or up.shape[0] != hidden:
                    raise LoraDropError(f"the correction of layer {index} maps width {down.shape[1]}: it does not fit "
                                        f"this model's hidden size {hidden} (made for another model).")
                correction = Correction(down, up)
                layer.add_module(CHILD, correction)
                self._restore.append(lambda layer=layer: delattr(layer, CHILD))
                self.corrections[index] = correction
            self.swap(layer, self._layer_forward(layer.forward, index, cache_index))

    def disabled(self):
        """The full model inside this block (a teacher for training): every layer runs, nothing is recorded."""
        import contextlib

        @contextlib.contextmanager
        def block():
            previous, self.enabled = self.enabled, False
            try:
                yield
            finally:
                self.enabled = previous

        return block()

    # -- the schedule of one forward ---------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._masks = {}
        if not self.enabled:
            self.kind = "off"
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        source = ids if isinstance(ids, torch.Tensor) else kwargs["inputs_embeds"]
        batch, tokens = source.shape[:2]
        device = source.device
        cache = cache_from(kwargs)
        start = cache.get_seq_length() if cache is not None else 0
        phase = "decode" if start > 0 else "prefill"
        every, lead = self.skipper.anchor_every, self.skipper.forced_prompt
        if phase == "prefill":
            self.step, self.delta = 0, {}
            self.expected = tokens  # (a cache the model makes itself, use_cache=True without one, is filled too)
            self.continuable = True
            anchor = None
            if lead is not None:
                positions = _positions(kwargs.get("attention_mask"), batch, tokens, start, device)
                anchor = (positions < lead) | ((positions - lead + 1) % every == 0)
                if bool(anchor.all()):
                    anchor = None
            if anchor is None or self.dry_run:
                self.kind = "full"
                self.kept = torch.arange(tokens, device=device)
                dropped = 0 if anchor is None else int((~anchor).sum())  # a dry run counts what it would drop
                self.stats.count(phase, batch * tokens, batch * tokens - dropped, dropped)
                return
            self.kind = "schedule"
            columns = torch.arange(tokens, device=device).expand(batch, tokens)
            self._anchor = anchor
            self._source = torch.where(anchor, columns, torch.zeros_like(columns)).cummax(dim=1).values
            uniform = bool((anchor == anchor[:1]).all())
            self.continuable = uniform
            self.kept = anchor[0].nonzero().flatten() if uniform else None
            self.stats.count(phase, batch * tokens, int(anchor.sum()), int((~anchor).sum()))
            return
        # decode: one token per row, continuing the prefill this handle saw
        if tokens != 1:
            raise LoraDropError(f"LoRA-Drop decodes one token per forward after the prefill; this forward extends the "
                                f"cache by {tokens} (speculative verification and chunked prefill are not supported).")
        if not self.continuable or self.expected != start or (self.skipper.droppable and not self.delta):
            why = ("its rows have different real positions, so their anchors differ" if not self.continuable else
                   "it was not filled under this LoRA-Drop handle (or was reordered or cropped)")
            raise LoraDropError(f"cannot continue decoding from this cache: {why}. Prefill under the same handle.")
        if lead is None:
            anchor_now = (self.step + 1) % every == 0
        else:
            positions = _positions(kwargs.get("attention_mask"), batch, 1, start, device)
            flags = (positions < lead) | ((positions - lead + 1) % every == 0)
            anchor_now = bool(flags[0, 0])
            if bool((flags != anchor_now).any()):
                raise LoraDropError("the rows of this batch have different real positions, so their anchors differ.")
        self.step += 1
        self.expected = start + 1
        self.stats.count(phase, batch, batch if anchor_now else 0, 0 if anchor_now else batch)
        if anchor_now or self.dry_run:
            self.kind = "anchor"
            self.kept = torch.cat([self.kept, torch.tensor([start], device=self.kept.device)])
        else:
            self.kind = "drop"

    # -- the swapped forward of a droppable layer ----------------------------------------------------------------------
    def _layer_forward(self, original: Callable, index: int, cache_index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            kind = self.kind
            if kind == "off":
                return original(hidden_states, *args, **kwargs)
            if kind == "drop":  # h_in + u(anchor) + B A n(h_in): no attention, no MLP, no cache entry
                out = hidden_states + self.delta[index]
                correction = self.corrections.get(index)
                return out if correction is None else out + correction(hidden_states)
            if kind == "full":  # every token computes and writes: the prefill of generation
                out = _tensor(original(hidden_states, *args, **kwargs))
                self.delta[index] = (out[:, -1:] - hidden_states[:, -1:]).detach()
                return out
            kwargs = self._masked(kwargs, hidden_states)
            out = _tensor(original(hidden_states, *args, **kwargs))
            if kind == "anchor":  # a decode step that computes; attention saw the kept columns only
                self.delta[index] = (out - hidden_states).detach()
                return out
            # schedule: every token computed (attention to anchor keys only); dropped tokens rebuilt from their anchor
            update = out - hidden_states  # [batch, tokens, d]
            reused = update.gather(1, self._source.unsqueeze(-1).expand_as(update))
            dropped = hidden_states + reused
            correction = self.corrections.get(index)
            if correction is not None:
                dropped = dropped + correction(hidden_states)
            cache = cache_from(kwargs)
            if cache is not None and self.kept is not None:  # keep only the anchors' keys and values at this layer
                slot = cache.layers[cache_index]
                slot.keys = slot.keys.index_select(-2, self.kept)
                slot.values = slot.values.index_select(-2, self.kept)
            self.delta[index] = reused[:, -1:].detach()
            return torch.where(self._anchor.unsqueeze(-1), out, dropped)

        return forward

    def _masked(self, kwargs: dict, hidden_states: torch.Tensor) -> dict:
        """``kwargs`` with the attention mask of a droppable layer: the kept columns (anchor decode step) or anchor
        keys only (schedule forward)."""
        if "attention_mask" not in kwargs:
            raise LoraDropError("this model's decoder layers take their attention mask positionally; LoRA-Drop needs "
                                "it as a keyword (attention_mask=...).")
        given = kwargs["attention_mask"]
        key = id(given)
        if key not in self._masks:
            self._masks[key] = (self._kept_mask(given) if self.kind == "anchor"
                                else self._schedule_mask(given, hidden_states))
        return {**kwargs, "attention_mask": self._masks[key]}

    def _kept_mask(self, given):
        if given is None:  # no padding, one query: it attends to every key the layer holds — the kept ones
            return None
        if not isinstance(given, torch.Tensor):
            raise LoraDropError(f"LoRA-Drop cannot slice an attention mask of type {type(given).__name__}.")
        return given.index_select(-1, self.kept.to(given.device))

    def _schedule_mask(self, given, hidden_states: torch.Tensor):
        """[batch, 1, tokens, tokens]: the causal (and padding) mask, keys restricted to anchors; each query also sees
        itself (a dropped token's attention output is discarded; this keeps its softmax finite)."""
        if given is not None and not isinstance(given, torch.Tensor):
            raise LoraDropError(f"LoRA-Drop cannot restrict an attention mask of type {type(given).__name__}.")
        tokens = hidden_states.shape[1]
        device = hidden_states.device
        if given is None:
            base = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()[None, None]
        elif given.dtype == torch.bool:
            base = given
        else:
            base = given > torch.finfo(given.dtype).min / 2
        allowed = base & self._anchor[:, None, None, :].to(base.device)
        allowed = allowed | torch.eye(tokens, dtype=torch.bool, device=allowed.device)
        implementation = getattr(getattr(self.model, "config", None), "_attn_implementation", None) or "eager"
        if given is None and implementation == "sdpa":
            return allowed
        if given is not None and given.dtype == torch.bool:
            return allowed
        dtype = given.dtype if given is not None else hidden_states.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)


def _tensor(output):
    """A decoder layer's output hidden states (transformers 5 returns a tensor; older layers a tuple)."""
    if isinstance(output, tuple):
        raise LoraDropError("this model's decoder layers return a tuple; LoRA-Drop needs transformers 5 layers, which "
                            "return the hidden states.")
    return output


def _positions(mask: Any, batch: int, tokens: int, start: int, device: torch.device) -> torch.Tensor:
    """[batch, tokens] real positions of this forward's tokens (left padding not counted; padding itself: -1 is never
    reached, a pad token counts as an anchor). From a 2D attention mask [batch, start + tokens], else ``start + i``."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = mask.to(device).long()
        positions = (mask.cumsum(-1) - 1)[:, -tokens:]
        return positions.masked_fill(mask[:, -tokens:] == 0, 0)
    return torch.arange(start, start + tokens, device=device).expand(batch, tokens)


__all__ = ["CHILD", "Correction", "LoraDropError", "LoraDropHandle", "LoraDropStats", "check_supported"]
