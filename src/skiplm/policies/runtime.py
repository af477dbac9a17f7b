"""The runtime of input-adaptive policies: :class:`PolicyHandle` (the swapped forwards that execute a policy's
per-token decisions, built on :mod:`skiplm.runtime.hooks`) and :class:`PolicyStats` (what they counted).

Execution (how a decision becomes saved time):

* a skipped **MLP** does not run for that token: at batch 1 in decode the MLP call is replaced by a zero; with many
  tokens, the MLP runs on the gathered rows that need it and zeros are scattered for the rest. Branch norms still run
  (a norm of zeros is zero, so post-norm families stay exact).
* a skipped **attention** (``lac`` with ``parts="layer"``) still *runs*, so the token's keys and values are written to
  the cache exactly as the full layer would write them from that token's residual; only its contribution to the
  residual is dropped. KV-cache rule: no hole, nothing to prove — but also no time saved on attention; the time a
  skipped layer saves is its MLP's. (Writing only K/V without the query path needs per-family projection code, which
  skiplm does not copy.)

Decisions are made before the sublayer they govern runs, from what the token has already computed: the signal of
layer l-1 decides layer l. Only the layers whose signal can matter are read, up to ``last_check`` (the last layer
whose signal may halt a token; :func:`~skiplm.policies.calibrate` picks it where later halts stop paying for their
checks): at batch-1 decode on CPU a check costs ~45 us, because every small op between the model's large matrix
products runs with cold caches. The per-token overhead is measured by ``skiplm bench --policy`` (``dry_run`` decides
but skips nothing).

The handle asks the policy only what :class:`Decider` lists, and knows nothing else about it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ..models.adapters import _get_path, get_adapter
from ..plan import PHASES
from ..runtime.hooks import Installed, cache_from, decoder_stack
from .maps import ActivationMap


class Decider(Protocol):
    """What the handle asks of a policy (:class:`~skiplm.policies.HaltingPolicy` is one): which layers it may skip and
    reads, and, per forward, the run masks it decides from what it observes."""

    num_layers: int
    skippable: range
    observed: range
    observes_mlp_input: bool  # remember the residual entering the MLP branch for observe()
    skips_attention: bool

    def begin(self, phase: str, batch: int, tokens: int, start: int, device: torch.device) -> None: ...

    def run_mask(self, layer: int, part: str) -> torch.Tensor | bool | None: ...

    def observe(self, layer: int, layer_input: torch.Tensor, mlp_input: torch.Tensor | None,
                layer_output: torch.Tensor) -> None: ...


@dataclasses.dataclass
class PolicyStats:
    """Sublayer executions under a policy, per phase: how many token-MLPs (and attention contributions) ran."""

    mlp_total: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    mlp_run: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    attention_total: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    attention_run: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def mlp_skip_ratio(self, phase: str) -> float | None:
        total = self.mlp_total[phase]
        return None if total == 0 else 1 - self.mlp_run[phase] / total

    def skipped_mlps_per_token(self, phase: str) -> float | None:
        tokens = self.tokens[phase]
        return None if tokens == 0 else (self.mlp_total[phase] - self.mlp_run[phase]) / tokens

    def to_json(self) -> dict[str, Any]:
        out = {}
        for phase in PHASES:
            if self.tokens[phase]:
                out[phase] = {
                    "tokens": self.tokens[phase],
                    "mlp_skip_ratio": self.mlp_skip_ratio(phase),
                    "skipped_mlps_per_token": self.skipped_mlps_per_token(phase),
                    "attention_skip_ratio": (1 - self.attention_run[phase] / self.attention_total[phase]
                                             if self.attention_total[phase] else 0.0),
                }
        return out


class PolicyHandle(Installed):
    """A policy applied to a model: the swapped MLP (and attention) forwards of the skippable layers and the hooks
    that feed the policy what it observes. Use as a context manager, or call :meth:`remove`."""

    def __init__(self, model: nn.Module, policy: Decider, *, dry_run: bool = False, record: bool = False):
        self.policy, self.dry_run, self.record = policy, dry_run, record
        self.stats = PolicyStats()
        self.maps: list[ActivationMap] = []
        self.phase = "prefill"
        self._tokens = (1, 1)
        self._mlp_input: torch.Tensor | None = None
        self._masks: dict[tuple[int, str], torch.Tensor | bool | None] = {}
        super().__init__(model)  # swaps the forwards (_install)

    def _install(self) -> None:
        # Everything here runs for every token, so it is cheap: forwards are swapped (a Python call) rather than hooked
        # (a module hook costs ~12 us a call on CPU), and only the layers that need it are touched: observers up to
        # `last_check`, run masks on the skippable layers.
        adapter = get_adapter(self.model)
        layers = adapter.decoder_layers(self.model)
        skippable, observed = self.policy.skippable, self.policy.observed
        self.hook(decoder_stack(self.model).register_forward_pre_hook(self._begin, with_kwargs=True))  # per forward
        for index, layer in enumerate(layers):
            mlp, mlp_norms = adapter.branch_modules(layer, "mlp")
            mlp_input = _get_path(layer, adapter.mlp_input)
            observes = index in observed
            remember = observes and self.policy.observes_mlp_input
            skip = index in skippable
            if observes:
                self.swap(layer, self._observed_layer_forward(layer.forward, index))
            if skip:
                # the branch's norms too: a token that skips the MLP skips them (as a static skip does)
                for norm in mlp_norms:
                    self.swap(norm, self._mlp_norm_forward(norm.forward, index, remember=remember and norm is mlp_input))
                self.swap(mlp, self._mlp_forward(mlp.forward, index, remember=remember and mlp is mlp_input))
                if self.policy.skips_attention:
                    attention, _ = adapter.branch_modules(layer, "attention")
                    self.swap(attention, self._attention_forward(attention.forward, index))
            if remember and not (skip and any(mlp_input is m for m in (mlp, *mlp_norms))):
                self.swap(mlp_input, self._remembering_forward(mlp_input.forward))

    # -- what runs during a forward
    def _begin(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        source = ids if isinstance(ids, torch.Tensor) else kwargs["inputs_embeds"]
        batch, tokens = source.shape[:2]
        cache = cache_from(kwargs)
        start = cache.get_seq_length() if cache is not None else 0
        self.phase = phase = "decode" if start > 0 else "prefill"
        self._tokens = (batch, tokens)
        self._masks = {}
        # every sublayer is counted as run now; _decide uncounts the token-sublayers a mask skips (cheaper per layer)
        stats, count = self.stats, batch * tokens * self.policy.num_layers
        stats.tokens[phase] += batch * tokens
        stats.mlp_total[phase] += count
        stats.mlp_run[phase] += count
        stats.attention_total[phase] += count
        stats.attention_run[phase] += count
        self.policy.begin(phase, batch, tokens, start, source.device)
        if self.record:
            self.maps.append(ActivationMap(phase, start, batch, tokens))

    def _observed_layer_forward(self, original: Callable, index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            output = original(hidden_states, *args, **kwargs)
            self.policy.observe(index, hidden_states, self._mlp_input,
                                output[0] if isinstance(output, tuple) else output)
            return output
        return forward

    def _mlp_norm_forward(self, original: Callable, index: int, *, remember: bool) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if remember:
                self._mlp_input = hidden_states
            if self._mask(index, "mlp") is False:  # no token runs this MLP: its norm is an identity, like the MLP's zero
                return hidden_states
            return original(hidden_states, *args, **kwargs)
        return forward

    def _remembering_forward(self, original: Callable) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            self._mlp_input = hidden_states
            return original(hidden_states, *args, **kwargs)
        return forward

    def _mask(self, index: int, part: str) -> torch.Tensor | bool | None:
        """The run mask of one skippable sublayer in this forward, decided once (norms and core ask alike)."""
        key = (index, part)
        if key not in self._masks:
            self._masks[key] = self._decide(index, part)
        return self._masks[key]

    def _decide(self, index: int, part: str) -> torch.Tensor | None:
        """The run mask of one skippable sublayer, counted; None: every token runs (also in a dry run)."""
        mask = self.policy.run_mask(index, part)
        if mask is not None:
            batch, tokens = self._tokens
            run = self.stats.mlp_run if part == "mlp" else self.stats.attention_run
            run[self.phase] -= batch * tokens - (0 if mask is False else int(mask.sum()))
        if self.record:
            batch, tokens = self._tokens
            getattr(self.maps[-1], part)[index] = (torch.full((batch, tokens), mask is None) if not torch.is_tensor(mask)
                                                   else mask.cpu())
        return None if self.dry_run else mask

    def _mlp_forward(self, original: Callable, index: int, *, remember: bool) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if remember:  # this family's MLP reads the residual stream itself
                self._mlp_input = hidden_states
            mask = self._mask(index, "mlp")
            if mask is None:
                return original(hidden_states, *args, **kwargs)
            if mask is False:  # no token runs it (batch-1 decode: the token halted)
                return torch.zeros_like(hidden_states)
            output = torch.zeros_like(hidden_states)
            if bool(mask.any()):
                # the MLP is position-wise: run it on the rows that need it, as one [1, rows, hidden] batch
                output[mask] = original(hidden_states[mask].unsqueeze(0), *args, **kwargs).squeeze(0).to(output.dtype)
            return output
        return forward

    def _attention_forward(self, original: Callable, index: int) -> Callable:
        def forward(*args, **kwargs):
            outputs = original(*args, **kwargs)  # always runs: the cache gets every token's keys and values
            mask = self._mask(index, "attention")
            if mask is None:
                return outputs
            kept = torch.zeros_like(outputs[0]) if mask is False else outputs[0] * mask.unsqueeze(-1).to(outputs[0].dtype)
            return (kept,) + tuple(outputs[1:])
        return forward
