"""FiRST (Jain et al. 2024, arXiv 2410.12513): a small router per skippable layer reads the prompt at prefill and
decides, once per sequence and row, whether that row skips the whole layer for the rest of the sequence.

Routers. Layer ``l`` of :attr:`FiRST.routed` has a linear router over the mean-pooled hidden state entering it
(``x = mean_t h_l[b, t]``, over the row's real tokens — the first ``route_tokens`` of them when set — then RMS
normalised): ``gate[b] = sigmoid(w_l . x / rms(x) + b_l)`` in [0, 1]. A row skips layer ``l`` when its gate is below
``threshold``. Routers run in order, so a router sees the stream as the earlier decisions left it.

What a skipped layer does, and the KV cache (the rule this module keeps):

* **prefill** — a row that skips layer ``l`` skips it for its prompt tokens too (``h = h``): the decision is made
  from the stream entering the layer, before the layer runs, and the whole sequence (prompt and continuation) then
  sees the same stack. So decoding with the cache equals one forward over prompt + continuation with the same
  decisions (``cached == recomputed``, tested).
* **decode** — each row follows its prefill decisions; there are no new decisions and no per-token overhead beyond
  one Python branch per routed layer.
* **cache** — a layer that *every* row skips writes a placeholder (``skiplm.runtime.advance_cache``: one float per
  token) that is never read, since the layer stays skipped for the sequence. A layer that only *some* rows skip runs
  for the whole batch, and its output is taken only for the rows that keep it (``torch.where``); the skipping rows'
  keys and values are written but only ever read by that same layer's attention for those rows, whose output is
  discarded — nothing a row reads differs from recomputation.

Batch > 1. Rows decide independently. A layer saves time only when every row of the batch skips it: a layer kept by
one row runs for all (decode on CPU and small GPUs is weight-bandwidth bound, so running a layer for 4 rows costs
about what it costs for 8; gathering a sub-batch would also need a per-layer cache split). ``benchmarks/first``
measures what this costs at batch 8.

A FiRST skipper may carry a LoRA adapter (peft's format, trained with the routers); it is merged into the weights
while installed (``merge="restorable"``: the original weights are copied back on ``remove()``), or attached unmerged
(``merge=False``). The file form is a folder (``first.json`` + ``routers.safetensors`` + ``adapter/``), see
:meth:`FiRST.save` / :func:`load_first`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..files import atomic_folder, check_output, check_record, read_json, write_bytes_atomic, write_text_atomic
from ..models.adapters import count_layers, get_adapter
from ..plan import ModelIdentity, check_made_for, model_identity
from ..registry import ROUTERS, SKIPPER_FILES, Option, Spec
from ..runtime.hooks import Installed, advance_cache, cache_from, decoder_stack, install_handle

PAPER = "Jain et al. 2024, FiRST: Finetuning Router-Selective Transformers for Input-Adaptive Latency Reduction " \
        "(arXiv 2410.12513)"
FORMAT_NAME = "skiplm.first"
SCHEMA_VERSION = 1
RECORD_FILE = "first.json"
ROUTERS_FILE = "routers.safetensors"
ADAPTER_FOLDER = "adapter"
PROMPT_TOKENS = 64  # the prompt a router reads when text is scored in one forward (training, perplexity)
MERGE_MODES = (False, True, "restorable")
_EPS = 1e-6


class RouterError(PlanError):
    """A FiRST router set, its folder or its training cannot be used as asked."""


def protected_layers(num_layers: int, protect_first: int | None, protect_last: int | None) -> range:
    """The layers that get a router: all but the first ``protect_first`` (None: ceil(layers / 8)) and the last
    ``protect_last`` (None: ceil(layers / 16)) — the same defaults as the halting policies."""
    first = math.ceil(num_layers / 8) if protect_first is None else protect_first
    last = math.ceil(num_layers / 16) if protect_last is None else protect_last
    for name, value in (("protect_first", first), ("protect_last", last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RouterError(f"{name} must be a whole number >= 0, got {value!r}.")
    if first + last >= num_layers:
        raise RouterError(f"protect_first={first} and protect_last={last} protect every one of the {num_layers} "
                          "layers: no layer is left to route; lower them.")
    return range(first, num_layers - last)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, route_tokens: int | None) -> torch.Tensor:
    """[batch, tokens, d] hidden states -> [batch, d] float32 mean over each row's real tokens (``mask`` [batch,
    tokens], True on real tokens; None: all), only the first ``route_tokens`` real tokens when set."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if route_tokens is not None:
        mask = mask & (mask.long().cumsum(-1) <= route_tokens)
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def gate_values(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[batch, d] pooled states, one router's [d] weight and [] bias -> [batch] gates in (0, 1)."""
    x = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + _EPS)
    return torch.sigmoid(x @ weight.float() + bias.float())


class Routers(nn.Module):
    """The routers' parameters: ``weight`` [routed layers, d] and ``bias`` [routed layers] (float32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = nn.Parameter(bias.detach().to(torch.float32).clone())

    def gate(self, position: int, pooled: torch.Tensor) -> torch.Tensor:
        return gate_values(pooled, self.weight[position], self.bias[position])


# -- what a handle counts ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RouterStats:
    """Per phase: tokens run, and token-blocks skipped (a skipped block skips its attention and its MLP). The keys
    of :meth:`to_json` are a policy's (``mlp_skip_ratio``, ``skipped_mlps_per_token``, ``attention_skip_ratio``) so
    ``skiplm bench`` accounts for a router set like a policy, plus ``skipped_blocks_per_token``, the decisions per
    sequence, ``blocks_skipped_by_every_row`` (per prefill: the blocks no row of the batch runs, what a step saves) and
    ``ideal_speedup`` (the cost model's, from those)."""

    num_layers: int
    block_share: float = 0.0  # one block's share of a step's cost (cost model), for ideal_speedup
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0})
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0})
    sequences: int = 0
    prefills: int = 0
    blocks_skipped_by_sequences: int = 0  # sum over sequences (rows) of the layers each skips
    blocks_skipped_by_all_rows: int = 0  # sum over prefills of the layers every row skipped (what saves time)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for phase in ("prefill", "decode"):
            tokens = self.tokens[phase]
            if not tokens:
                continue
            per_token = self.skipped[phase] / tokens
            ratio = per_token / self.num_layers
            # what a step saves: the blocks every row of the batch skips (a block one row keeps runs for all)
            saved = self.blocks_skipped_by_all_rows / self.prefills if self.prefills else per_token
            out[phase] = {"tokens": tokens, "mlp_skip_ratio": ratio, "skipped_mlps_per_token": per_token,
                          "attention_skip_ratio": ratio, "skipped_blocks_per_token": per_token,
                          "blocks_skipped_by_every_row": saved,
                          "ideal_speedup": 1.0 / max(1.0 - saved * self.block_share, _EPS)}
        if self.sequences:
            out["sequences"] = self.sequences
            out["skipped_blocks_per_sequence"] = self.blocks_skipped_by_sequences / self.sequences
        return out


# -- the handles -------------------------------------------------------------------------------------------------------
class _RoutedHandle(Installed):
    """What both handles share: a pre-hook on the decoder stack that reads the phase, the batch and the 2D padding
    mask of each forward, and one swapped forward per routed layer (``_layer_forward``)."""

    def __init__(self, model: nn.Module, first: FiRST):
        self.first = first
        self.phase = "prefill"
        self._mask: torch.Tensor | None = None
        self._shape = (1, 1)
        super().__init__(model)

    def _install(self) -> None:
        layers = get_adapter(self.model).decoder_layers(self.model)
        self.hook(decoder_stack(self.model).register_forward_pre_hook(self._begin, with_kwargs=True))
        for position, index in enumerate(self.first.routed):
            layer = layers[index]
            attention = get_adapter(self.model).branch_modules(layer, "attention")[0]
            self.swap(layer, self._layer_forward(layer.forward, position, getattr(attention, "layer_idx", index)))

    def _begin(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        source = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        cache = cache_from(kwargs)
        self.phase = "decode" if cache is not None and cache.get_seq_length() > 0 else "prefill"
        self._shape = tuple(source.shape[:2]) if isinstance(source, torch.Tensor) else (1, 1)
        mask = kwargs.get("attention_mask")
        self._mask = (mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2
                      and tuple(mask.shape) == self._shape else None)
        self._start()

    def _start(self) -> None:
        """A forward starts (``self.phase``, ``self._shape``, ``self._mask`` are set)."""

    def _layer_forward(self, original: Callable, position: int, cache_index: int) -> Callable:
        raise NotImplementedError


class FirstHandle(_RoutedHandle):
    """A FiRST router set applied to a model (hard decisions). ``decisions``: [batch, routed layers] bool, True
    where a row skips that layer (set at each prefill); :meth:`skipped_layers` lists them per row. ``stats``: what
    was skipped (:class:`RouterStats`). ``dry_run``: decide and count, skip nothing (the decision overhead)."""

    def __init__(self, model: nn.Module, first: FiRST, *, dry_run: bool = False, merge: bool | str = "restorable"):
        self.dry_run, self.merge = dry_run, merge
        self.decisions: torch.Tensor | None = None
        self._rows: list[str] = []  # per routed layer, in this sequence: "none" skip, "all" skip, "some" skip
        self._skipped_per_row_sum = 0
        self.peft_model = None
        super().__init__(model, first)
        self.stats = RouterStats(first.num_layers, _block_share(model))

    def _install(self) -> None:
        if self.first.adapter is not None:
            self._attach_adapter()
        self._routers = {name: t.detach().to(_device(self.model)) for name, t in
                         (("weight", self.first.weight), ("bias", self.first.bias))}
        super()._install()

    def _attach_adapter(self) -> None:
        from ..heal.artifact import _copy_back
        from ..heal.spans import HealError

        try:
            if self.merge:
                originals = self.first.adapter.merge(self.model)
                if self.merge == "restorable":
                    self._restore.append(lambda: _copy_back(originals))
            else:
                self.peft_model, detach = self.first.adapter.attach(self.model)
                self._restore.append(detach)
        except HealError as exc:
            raise RouterError(str(exc).replace("LoRA-healed model", "FiRST adapter")) from None

    def skipped_layers(self) -> list[list[int]]:
        """Per row of the last prefill: the layers it skips for the sequence."""
        if self.decisions is None:
            return []
        routed = self.first.routed
        return [[routed[j] for j in torch.nonzero(row).flatten().tolist()] for row in self.decisions.cpu()]

    def _start(self) -> None:
        batch, tokens = self._shape
        if self.phase == "prefill":
            self.decisions = torch.zeros(batch, len(self.first.routed), dtype=torch.bool)
            self._rows = ["none"] * len(self.first.routed)
            self._skipped_per_row_sum = 0
            self.stats.sequences += batch
            self.stats.prefills += 1
        elif self.decisions is not None and self.decisions.shape[0] != batch:
            raise RouterError(f"a decode step of batch {batch} follows a prefill of batch {self.decisions.shape[0]}: "
                              "FiRST decides per row at prefill, so the batch may not change in between (beam search "
                              "and cache reordering are not supported).")
        self.stats.tokens[self.phase] += batch * tokens
        if self.phase == "decode":
            self.stats.skipped["decode"] += tokens * self._skipped_per_row_sum

    def _decide(self, position: int, hidden: torch.Tensor) -> str:
        """Prefill: the rows that skip routed layer ``position`` (recorded in ``decisions``); returns none/all/some."""
        gates = gate_values(pool(hidden, self._mask, self.first.route_tokens), self._routers["weight"][position],
                            self._routers["bias"][position])
        skip = (gates < self.first.threshold).cpu()
        self.decisions[:, position] = skip
        count = int(skip.sum())
        batch, tokens = self._shape
        self._skipped_per_row_sum += count
        self.stats.skipped["prefill"] += count * tokens
        self.stats.blocks_skipped_by_sequences += count
        kind = "none" if count == 0 else "all" if count == batch else "some"
        if kind == "all":
            self.stats.blocks_skipped_by_all_rows += 1
        self._rows[position] = kind
        return kind

    def _layer_forward(self, original: Callable, position: int, cache_index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if self.phase == "prefill":
                kind = self._decide(position, hidden_states)
            else:
                kind = self._rows[position] if self.decisions is not None else "none"
            if kind == "none" or self.dry_run:
                return original(hidden_states, *args, **kwargs)
            if kind == "all":  # every row skips it for the sequence: h = h, a placeholder in the cache
                advance_cache(cache_from(kwargs), cache_index, hidden_states)
                return hidden_states
            output = original(hidden_states, *args, **kwargs)  # some rows keep it: it runs, they take its output
            layer_output = output[0] if isinstance(output, tuple) else output
            keep = ~self.decisions[:, position].to(hidden_states.device)
            mixed = torch.where(keep[:, None, None], layer_output, hidden_states)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
        return forward


class SoftGateHandle(_RoutedHandle):
    """Training: every routed layer runs and its residual contribution is scaled by its gate, per row:
    ``h_out = h + g * (layer(h) - h)``, with ``g`` from the router over the first ``route_tokens`` tokens.
    The routers are a submodule of the model while installed (``skiplm_routers``), so an optimizer over the model's
    parameters trains them; :meth:`trainable_parameters` and :meth:`training_loss` are what
    :class:`skiplm.train.distill.Student` and ``distill`` ask of a handle. ``disabled()``: the full model (teacher)."""

    ATTRIBUTE = "skiplm_routers"

    def __init__(self, model: nn.Module, first: FiRST, routers: Routers, *, target_keep: float, cost_weight: float,
                 straight_through: bool):
        self.routers, self.target_keep, self.cost_weight = routers, target_keep, cost_weight
        self.straight_through = straight_through
        self.enabled = True
        self.gates: list[torch.Tensor] = []
        super().__init__(model, first)

    def _install(self) -> None:
        if hasattr(self.model, self.ATTRIBUTE):
            raise RouterError(f"the model already has a '{self.ATTRIBUTE}' attribute.")
        self.model.add_module(self.ATTRIBUTE, self.routers)
        self._restore.append(lambda: delattr(self.model, self.ATTRIBUTE))
        super()._install()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    def _start(self) -> None:
        if self.enabled:
            self.gates = []

    def training_loss(self) -> torch.Tensor:
        """The cost term: ``cost_weight * (mean gate - target keep share)^2`` over the last forward's rows and routed
        layers (a mean gate of 1 - skip ratio is the target)."""
        if not self.gates:
            return torch.zeros(())
        mean = torch.stack(self.gates).mean()
        return self.cost_weight * (mean - self.target_keep) ** 2

    def mean_gate(self) -> float | None:
        return float(torch.stack(self.gates).mean()) if self.gates else None

    def _layer_forward(self, original: Callable, position: int, cache_index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            output = original(hidden_states, *args, **kwargs)
            if not self.enabled:
                return output
            layer_output = output[0] if isinstance(output, tuple) else output
            gate = self.routers.gate(position, pool(hidden_states, self._mask, self.first.route_tokens))  # [batch]
            self.gates.append(gate)
            if self.straight_through:  # forward: the hard decision at 0.5; backward: the soft gate's gradient
                gate = gate + ((gate >= 0.5).to(gate.dtype) - gate).detach()
            gate = gate.to(layer_output.dtype)[:, None, None]
            mixed = hidden_states + gate * (layer_output - hidden_states)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
        return forward


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _block_share(model: nn.Module) -> float:
    """One decoder block's share of a decode step's cost by the cost model (its parameters over all read)."""
    from ..measure.costs import CostModel

    costs = CostModel.from_parameter_counts(model)
    blocks = [a + m for a, m in zip(costs.attention, costs.mlp)]
    return (sum(blocks) / len(blocks)) / costs.total


# -- the skipper -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FiRST:
    """A set of FiRST routers for one model: the routed layers, the routers' weights, the threshold, and optionally
    the LoRA adapter trained with them (a :class:`skiplm.heal.artifact.AdapterStep`).

    ``weight`` [len(routed), hidden], ``bias`` [len(routed)]. A row skips routed layer ``routed[j]`` for the
    sequence when ``gate_j < threshold`` (``threshold <= 0``: never). ``route_tokens``: at prefill a router pools the
    first that many real tokens of the row (None: the whole prompt); ``prompt_tokens``: the prompt a router reads
    when text is scored in one forward (:meth:`teacher_forced`: perplexity), as it was trained."""

    num_layers: int
    routed: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    threshold: float = 0.5
    route_tokens: int | None = None
    prompt_tokens: int = PROMPT_TOKENS
    adapter: Any = None
    model: ModelIdentity | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    method = "first"
    input_adaptive = True  # what it skips depends on the prompt; its handle counts it (stats)
    skips_attention = True  # a skipped layer drops its attention contribution as well as its MLP

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise RouterError(f"num_layers must be a whole number >= 1, got {self.num_layers!r}.")
        routed = tuple(self.routed)
        if (not routed or any(isinstance(i, bool) or not isinstance(i, int) for i in routed)
                or list(routed) != sorted(set(routed)) or routed[0] < 0 or routed[-1] >= self.num_layers):
            raise RouterError(f"routed layers must be distinct increasing layer indices below {self.num_layers}, got "
                              f"{list(self.routed)!r}.")
        self.routed = routed
        if not (torch.is_tensor(self.weight) and torch.is_tensor(self.bias) and self.weight.dim() == 2
                and self.bias.dim() == 1 and self.weight.shape[0] == len(routed) == self.bias.shape[0]):
            raise RouterError(f"router weights must be [{len(routed)}, hidden] and [{len(routed)}] tensors, got "
                              f"{_shape(self.weight)} and {_shape(self.bias)}.")
        if not torch.isfinite(self.weight).all() or not torch.isfinite(self.bias).all():
            raise RouterError("router weights hold NaN or infinite values; train again.")
        self.weight = self.weight.detach().to(torch.float32).cpu()
        self.bias = self.bias.detach().to(torch.float32).cpu()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not math.isfinite(
                self.threshold):
            raise RouterError(f"threshold must be a number, got {self.threshold!r}.")
        self.threshold = float(self.threshold)
        for name in ("route_tokens", "prompt_tokens"):
            value = getattr(self, name)
            if (value is not None or name == "prompt_tokens") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RouterError(f"{name} must be a whole number >= 1{' or None' if name == 'route_tokens' else ''}, "
                                  f"got {value!r}.")

    @classmethod
    def initial(cls, model: nn.Module, *, protect_first: int | None = None, protect_last: int | None = None,
                bias: torch.Tensor | float = 3.0, threshold: float = 0.5, **fields: Any) -> FiRST:
        """Routers for ``model`` that read nothing yet (zero weights) and keep every layer at ``bias`` 3 (gate 0.95);
        ``bias`` may be one value per routed layer."""
        num_layers = count_layers(model)
        routed = tuple(protected_layers(num_layers, protect_first, protect_last))
        hidden = model.get_input_embeddings().weight.shape[1]
        bias = torch.full((len(routed),), float(bias)) if not torch.is_tensor(bias) else bias.float()
        return cls(num_layers, routed, torch.zeros(len(routed), hidden), bias, threshold, model=model_identity(model),
                   **fields)

    # the skipper protocol
    @property
    def skippable(self) -> tuple[int, ...]:
        """The layers a row may skip (``skiplm bench``'s probe skips their MLPs)."""
        return self.routed

    def check_model(self, model: nn.Module) -> None:
        check_made_for(model, self.num_layers, self.model, what="FiRST router set",
                       remedy="Train routers for this model with `skiplm first`")
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.weight.shape[1] != hidden:
            raise RouterError(f"the routers read hidden states of size {self.weight.shape[1]}, the model's are {hidden}.")

    def describe(self) -> str:
        skipped = self.provenance.get("calibrated_blocks_per_sequence")
        calibrated = f", {skipped:.1f} blocks skipped per sequence on calibration prompts" if isinstance(
            skipped, float) else ""
        adapter = f", LoRA r{self.adapter.config.r}" if self.adapter is not None else ""
        return (f"first (routers on layers {self.routed[0]}-{self.routed[-1]}, threshold {self.threshold:.4g}"
                f"{calibrated}{adapter})")

    def teacher_forced(self) -> FiRST:
        """Scoring text in one forward: the routers read the first ``prompt_tokens`` tokens (the prompt), every token
        then runs the layers chosen for the row (what decoding after that prompt runs)."""
        return dataclasses.replace(self, route_tokens=self.prompt_tokens)

    def is_empty(self) -> bool:
        return self.threshold <= 0 and self.adapter is None

    def install(self, model: nn.Module, *, check_model: bool = True, dry_run: bool = False,
                merge: bool | str = "restorable", record: bool = False) -> FirstHandle:
        """Apply the routers (and the adapter: merged, restorably by default; ``merge=False``: attached unmerged) to
        ``model``. ``dry_run``: decide and count, skip nothing. ``record`` is a per-token policy's option: refused."""
        if merge not in MERGE_MODES:
            raise RouterError(f"merge must be False, True or 'restorable', got {merge!r}.")
        if record:
            raise RouterError("FiRST decides once per sequence, not per token: there is no activation map to record; "
                              "read handle.skipped_layers() after a prefill.")
        if not check_model:
            hidden = model.get_input_embeddings().weight.shape[1]
            if self.weight.shape[1] != hidden:
                raise RouterError(f"the routers read hidden states of size {self.weight.shape[1]}, the model's are "
                                  f"{hidden}.")
        return install_handle(self, model, lambda: FirstHandle(model, self, dry_run=dry_run, merge=merge),
                              check_model=check_model, what="FiRST router set")

    def soft(self, routers: Routers, *, target_keep: float, cost_weight: float = 5.0,
             straight_through: bool = False) -> SoftGates:
        """The training form of these routers (soft gates over ``routers``' parameters): a skipper to train with."""
        return SoftGates(self, routers, target_keep, cost_weight, straight_through)

    # files
    def _files(self) -> dict[str, bytes]:
        from ..heal.artifact import _safetensors_bytes

        files = {ROUTERS_FILE: _safetensors_bytes({"weight": self.weight, "bias": self.bias})}
        if self.adapter is not None:
            files.update({f"{ADAPTER_FOLDER}/{name.split('/', 1)[1]}": data
                          for name, data in self.adapter.files().items()})
        return files

    def to_json(self, files: dict[str, bytes] | None = None) -> dict[str, Any]:
        files = self._files() if files is None else files
        return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "method": self.method,
                "num_layers": self.num_layers, "description": self.describe(), "routed": list(self.routed),
                "threshold": self.threshold, "route_tokens": self.route_tokens, "prompt_tokens": self.prompt_tokens,
                "router": {"kind": "linear", "input": "mean-pooled hidden state entering the layer, RMS normalised",
                           "hidden": int(self.weight.shape[1])},
                "adapter": None if self.adapter is None else self.adapter.record(),
                "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for name, data in sorted(files.items())},
                "model": self.model.to_json() if self.model else None, "provenance": self.provenance}

    def save(self, folder: str | Path) -> Path:
        """Write the FiRST folder (``first.json``, ``routers.safetensors``, ``adapter/`` in peft's format), whole or
        not at all; an earlier FiRST folder there is replaced once the new one is complete."""
        folder = check_output(folder, kind="folder", what="FiRST folder")
        if folder.is_file():
            raise RouterError(f"{folder} is a file; a FiRST router set is saved as a folder.")
        replace = (folder / RECORD_FILE).is_file()
        files = self._files()
        with atomic_folder(folder, replace=replace) as building:
            for name, data in files.items():
                (building / name).parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(building / name, data)
            write_text_atomic(building / RECORD_FILE, json.dumps(self.to_json(files), indent=2) + "\n")
        return folder


@dataclasses.dataclass
class SoftGates:
    """A FiRST router set in training form: a skipper whose handle (:class:`SoftGateHandle`) scales each routed
    layer's contribution by its gate. Not saved: training ends with :class:`FiRST` routers and a threshold."""

    first: FiRST
    routers: Routers
    target_keep: float
    cost_weight: float
    straight_through: bool

    input_adaptive = True

    @property
    def num_layers(self) -> int:
        return self.first.num_layers

    @property
    def provenance(self) -> dict[str, Any]:
        return self.first.provenance

    def check_model(self, model: nn.Module) -> None:
        self.first.check_model(model)

    def describe(self) -> str:
        return f"first soft gates on layers {self.first.routed[0]}-{self.first.routed[-1]} (training)"

    def teacher_forced(self) -> SoftGates:
        return self

    def is_empty(self) -> bool:
        return False

    def install(self, model: nn.Module, *, check_model: bool = True) -> SoftGateHandle:
        first = dataclasses.replace(self.first, route_tokens=self.first.prompt_tokens)
        return install_handle(self, model, lambda: SoftGateHandle(
            model, first, self.routers, target_keep=self.target_keep, cost_weight=self.cost_weight,
            straight_through=self.straight_through), check_model=check_model, what="FiRST router set")

    def to_json(self) -> dict[str, Any]:
        raise RouterError("soft gates are the training form of FiRST routers; save the trained FiRST instead.")

    def save(self, path: str | Path) -> Path:
        return self.to_json()


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if torch.is_tensor(value) else type(value).__name__


# -- reading -----------------------------------------------------------------------------------------------------------
def load_first(path: str | Path) -> FiRST:
    """The FiRST router set a folder written by ``skiplm first`` (or :meth:`FiRST.save`) holds — the folder or its
    ``first.json`` — every file checked by size and checksum."""
    folder = Path(path)
    if folder.is_file() and folder.name == RECORD_FILE:
        folder = folder.parent
    record = folder / RECORD_FILE
    if not folder.is_dir() or not record.is_file():
        raise RouterError(f"{path} is not a FiRST folder (no {RECORD_FILE} in it); make one with `skiplm first`.")
    data = check_record(read_json(record, RouterError, "Train again."), format_name=FORMAT_NAME,
                        schema_version=SCHEMA_VERSION, error=RouterError, what="a FiRST record", where=record)
    files = _read_files(folder, data.get("files"))
    if ROUTERS_FILE not in files:
        raise RouterError(f"{record} lists no {ROUTERS_FILE}; the folder is incomplete. Train again.")
    from ..heal.artifact import _read_safetensors

    try:
        tensors = _read_safetensors(files[ROUTERS_FILE], folder / ROUTERS_FILE)
    except PlanError as exc:
        raise RouterError(str(exc).replace("heal again with `skiplm heal`", "train again")) from None
    adapter = None
    if data.get("adapter") is not None:
        adapter = _read_adapter(folder, files)
    try:
        model = ModelIdentity.from_json(data["model"]) if data.get("model") is not None else None
        return FiRST(num_layers=data["num_layers"], routed=tuple(data["routed"]), weight=tensors.get("weight"),
                     bias=tensors.get("bias"), threshold=data["threshold"], route_tokens=data.get("route_tokens"),
                     prompt_tokens=data.get("prompt_tokens", PROMPT_TOKENS), adapter=adapter, model=model,
                     provenance=dict(data.get("provenance") or {}))
    except (KeyError, TypeError) as exc:
        raise RouterError(f"{record} is malformed (missing or bad {exc}); train again with `skiplm first`.") from None
    except PlanError as exc:
        raise RouterError(f"{record}: {exc}") from None


def _read_adapter(folder: Path, files: dict[str, bytes]):
    from peft import LoraConfig

    from ..heal.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterStep, _read_safetensors

    weights = f"{ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}"
    if f"{ADAPTER_FOLDER}/{ADAPTER_CONFIG}" not in files or weights not in files:
        raise RouterError(f"{folder / RECORD_FILE} names an adapter but lists no {ADAPTER_FOLDER}/{ADAPTER_CONFIG} and "
                          f"{ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}; train again.")
    try:
        config = LoraConfig.from_pretrained(str(folder / ADAPTER_FOLDER))
    except Exception as exc:  # noqa: BLE001 (peft raises several types for a bad config)
        raise RouterError(f"{folder / ADAPTER_FOLDER / ADAPTER_CONFIG} is not a readable peft LoRA config ({exc}).") from None
    try:
        state = _read_safetensors(files[weights], folder / weights)
    except PlanError as exc:
        raise RouterError(str(exc).replace("heal again with `skiplm heal`", "train again")) from None
    return AdapterStep(config, state)


def _read_files(folder: Path, listed: Any) -> dict[str, bytes]:
    """The files ``first.json`` lists, each checked against its recorded size and checksum."""
    if not isinstance(listed, dict) or not listed:
        raise RouterError(f"{folder / RECORD_FILE} lists no files; train again with `skiplm first`.")
    out = {}
    for name, check in listed.items():
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise RouterError(f"{folder / RECORD_FILE} names a file outside its folder ({name}).")
        path = folder / name
        if not path.is_file():
            raise RouterError(f"{path} is missing: the FiRST folder is incomplete. Train again with `skiplm first`.")
        data = path.read_bytes()
        check = check if isinstance(check, dict) else {}
        if check.get("bytes") is not None and len(data) != check["bytes"]:
            raise RouterError(f"{path} has {len(data)} bytes, {check['bytes']} were written: it is truncated or was "
                              "changed. Train again.")
        if check.get("sha256") is not None and hashlib.sha256(data).hexdigest() != check["sha256"]:
            raise RouterError(f"{path} does not match the checksum in {RECORD_FILE}: it was changed or damaged.")
        out[name] = data
    return out


def _from_record(data: Any) -> FiRST:
    raise RouterError("a FiRST record holds only the description of its router weights: load its folder (the folder "
                      f"or its {RECORD_FILE}) with skiplm.load_skipper(path).")


SKIPPER_FILES.add(Spec(name=FORMAT_NAME, target=_from_record, kind=SKIPPER_FILES.kind,
                       summary="FiRST routers (`skiplm first`): a folder with first.json",
                       extra={"load": load_first, "folder_file": RECORD_FILE}))

def _options() -> tuple[Option, ...]:
    from ..heal.train import MODULE_CHOICES, _training_options

    return (
        Option("rank", int, 16, "LoRA rank (0: routers only, no adapter)"),
        Option("alpha", float, 0.0, "LoRA alpha (0: twice the rank)"),
        Option("modules", str, "all", "which linear layers get an adapter", MODULE_CHOICES),
        Option("cost_weight", float, 5.0, "weight of the cost term (mean gate - target keep share)^2"),
        Option("prompt_tokens", int, PROMPT_TOKENS, "tokens of each training sequence the routers read (its prompt)"),
        Option("straight_through", bool, False, "hard gates forward, soft gradients backward"),
        *_training_options(2e-4, 200),
    )


ROUTERS.register(
    "first",
    paper=PAPER,
    needs={"calibration"},
    calibration=(136, 256),
    summary="per-sequence layer routers decided at prefill from the prompt, trained with soft gates, a skip-rate "
            "cost and LoRA by distillation toward the full model; a threshold calibrated to a target speedup",
    options=_options(),
)(FiRST)

__all__ = ["FORMAT_NAME", "FiRST", "FirstHandle", "PAPER", "RECORD_FILE", "RouterError", "RouterStats", "Routers",
           "SoftGateHandle", "SoftGates", "gate_values", "load_first", "pool", "protected_layers"]
