"""Speed: prefill latency and decode throughput of the full model and of plans, measured in the same run.

Method. Every configuration (the full model, each plan, optionally a copy with the plan's blocks physically deleted and
the *same* weight tensors) is measured interleaved — within a round, each measure runs on every configuration back to
back, in an order that alternates between rounds — after warm-up rounds that are not recorded, and reported as the
median over rounds. Prompts are real text (GSM8K), different per batch row.

* prefill: one forward over ``[batch, prompt_tokens]`` that fills a fresh KV cache; reported in ms and tokens/s.
* decode: after a (untimed) prefill of ``[batch, decode_prompt_tokens]``, ``new_tokens`` greedy steps with the KV cache
  in a plain loop (no ``generate()`` bookkeeping, no early stop); reported in tokens/s (batch x steps / time).

Speedups are full-model time / configuration time (>1 is faster), paired by round: the median over rounds of the
ratio of two measurements taken back to back. On a shared VM whose speed drifts by tens of percent within seconds,
this is far steadier than a ratio of medians (also reported, as ``speedup_of_medians``). The ideal ratio is the cost model's
(:mod:`skiplm.measure.costs`): the fraction of weight reads a plan removes, so the gap between ideal and measured is overhead.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .costs import CostModel
from ..errors import DataError
from ..plan import SkipPlan
from ..export.prune import prune_blocks
from ..skipper import Skipper, apply, fixed_plan, is_healed
from .rows import FULL, check_row_names


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 256
    decode_prompt_tokens: int = 64
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1
    # decode prompts: "corpus" (consecutive chunks of the corpus text) or "gsm8k-chat" (the last
    # decode_prompt_tokens tokens of GSM8K questions in the chat template: the model answers, as in real use)
    decode_prompts: str = "corpus"

    def measures(self) -> list[str]:
        return [f"{kind}_b{b}" for b in self.batch_sizes for kind in ("prefill", "decode")]


@dataclasses.dataclass
class Config:
    """One thing to time: a model object, optionally with a skipper (a plan or an input-adaptive policy) applied while
    it runs, installed with ``options`` (e.g. ``dry_run=True``: a policy that decides but skips nothing, whose cost
    over ``full`` is the decision overhead)."""

    name: str
    model: nn.Module
    plan: Skipper | None = None
    ideal_decode: float = 1.0
    ideal_prefill: float = 1.0
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def dry_run(self) -> bool:
        return bool(self.options.get("dry_run"))


@torch.inference_mode()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=True)
    _sync(ids)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    out = model(ids, use_cache=True)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    _sync(ids)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
    _sync(ids)
    return time.perf_counter() - start


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def prompt_batch(corpus_ids: torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
    """``batch`` different real-text prompts of ``length`` tokens."""
    needed = batch * length
    if corpus_ids.numel() < needed:
        corpus_ids = corpus_ids.repeat(needed // corpus_ids.numel() + 1)
    return corpus_ids[:needed].view(batch, length).to(device)


MLP_PROBE = "static probe: skippable MLPs skipped"


def make_configs(model: nn.Module, plans: Mapping[str, Skipper], *, compare_pruned: bool,
                 check_model: bool = True) -> list[Config]:
    """The full model, each plan, and (for block-only plans, not healed ones, if asked) a physically pruned copy of the
    model. An
    input-adaptive skipper (a policy) comes with a decisions-only run and, once, the static probe that skips every
    MLP it may skip (see :func:`account_policies`). Rows are keyed by name: a plan named like the full model or like
    another row is a :class:`~skiplm.errors.DataError` (see :func:`skiplm.measure.rows.plan_names`).
    ``check_model=False``: plans made for other weights too."""
    check_row_names(plans)
    costs = CostModel.from_parameter_counts(model)
    configs = [Config(FULL, model)]
    probe_added = False
    for name, plan in plans.items():
        if check_model:
            plan.check_model(model)
        if getattr(plan, "input_adaptive", False):
            # the ideal speedup of a policy depends on the input: it is filled in from what it skipped while timed
            configs += [Config(name, model, plan),
                        Config(f"{name} (decisions only)", model, plan, options={"dry_run": True})]
            if not probe_added:
                probe = SkipPlan.from_layers(plan.num_layers, mlp=plan.skippable)
                configs.append(Config(MLP_PROBE, model, probe, costs.ideal_speedup(probe.decode),
                                      costs.ideal_speedup(probe.prefill)))
                probe_added = True
            continue
        fixed = fixed_plan(plan)  # a healed plan's skips are its plan's (a pruned copy would not be healed: none)
        configs.append(Config(name, model, plan, costs.ideal_speedup(fixed.decode), costs.ideal_speedup(fixed.prefill)))
        if is_healed(plan) and plan.step("lora") is not None:  # its adapter's overhead, and its speed once merged
            configs.append(Config(f"{name}, merged", model, plan, configs[-1].ideal_decode, configs[-1].ideal_prefill,
                                  options={"merge": "restorable"}))
        block_only = fixed.prefill == fixed.decode and set(fixed.decode.attention) == set(fixed.decode.mlp)
        if compare_pruned and block_only and not fixed.decode.is_empty() and not is_healed(plan):
            pruned = prune_blocks(model, fixed.decode.blocks, share_weights=True)  # same memory as `full`
            configs.append(Config(f"{name} (layers deleted)", pruned, None, configs[-1].ideal_decode, configs[-1].ideal_prefill))
    names = [config.name for config in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"two rows would be named {', '.join(map(repr, repeated))}: rename the plan file(s) so that "
                        "no plan takes the name of another row.")
    return configs


def chat_prompt_batch(chat_prompts: list[list[int]], batch: int, length: int, device) -> torch.Tensor:
    """The last ``length`` tokens of the first ``batch`` chat prompts that are at least that long."""
    long_enough = [ids[-length:] for ids in chat_prompts if len(ids) >= length][:batch]
    if len(long_enough) < batch:
        raise DataError(f"fewer than {batch} chat prompts have {length} tokens; lower --decode-prompt-tokens.")
    return torch.tensor(long_enough, device=device)


def run_bench(
    configs: list[Config],
    corpus_ids: torch.Tensor,
    settings: BenchSettings = BenchSettings(),
    progress: Callable[[str], None] | None = None,
    chat_prompts: list[list[int]] | None = None,
) -> dict:
    """Time every configuration on every measure; returns samples (seconds), medians and ratios to ``full``.
    ``chat_prompts`` (token ids) are the decode prompts when ``settings.decode_prompts`` is "gsm8k-chat"."""
    names = [config.name for config in configs]
    if names[:1] != [FULL] or len(set(names)) != len(names):
        raise DataError(f"configurations must be the full model (named {FULL!r}) first, then distinctly named others; "
                        f"got {', '.join(map(repr, names))}.")
    device = next(configs[0].model.parameters()).device
    if settings.decode_prompts not in ("corpus", "gsm8k-chat"):
        raise DataError(f"decode prompts must be 'corpus' or 'gsm8k-chat', got {settings.decode_prompts!r}.")
    if settings.decode_prompts == "gsm8k-chat" and not chat_prompts:
        raise DataError("decode prompts 'gsm8k-chat' need the encoded chat prompts (chat_prompts=...).")
    inputs = {}
    for batch in settings.batch_sizes:
        inputs[f"prefill_b{batch}"] = prompt_batch(corpus_ids, batch, settings.prompt_tokens, device)
        if settings.decode_prompts == "gsm8k-chat":
            inputs[f"decode_b{batch}"] = chat_prompt_batch(chat_prompts, batch, settings.decode_prompt_tokens, device)
        else:
            inputs[f"decode_b{batch}"] = prompt_batch(corpus_ids, batch, settings.decode_prompt_tokens, device)
    samples = {c.name: {m: [] for m in settings.measures()} for c in configs}
    policy_stats = {}  # per config whose handle counts what it skipped (a policy's): per measure, those counts
    for round_index in range(settings.warmup + settings.repeats):
        # Interleave at the finest grain (each measure, every config back to back) and alternate the order between
        # rounds, so slow drift of the machine and position in the round fall on every config alike.
        order = configs if round_index % 2 == 0 else configs[::-1]
        for measure in settings.measures():
            ids = inputs[measure]
            for config in order:
                handle = apply(config.model, config.plan, check_model=False, **config.options) if config.plan else None
                try:
                    if measure.startswith("prefill"):
                        seconds = time_prefill(config.model, ids)
                    else:
                        seconds = time_decode(config.model, ids, settings.new_tokens)
                finally:
                    if handle:
                        handle.remove()
                if round_index >= settings.warmup:
                    samples[config.name][measure].append(seconds)
                    stats = getattr(handle, "stats", None)
                    if stats is not None:
                        phase = "prefill" if measure.startswith("prefill") else "decode"
                        per_measure = policy_stats.setdefault(config.name, {m: [] for m in settings.measures()})
                        per_measure[measure].append(stats.to_json()[phase])
                if progress:
                    progress(f"{config.name}: {measure}")
    results = summarize(configs, samples, settings)
    if policy_stats:
        account_policies(results, configs, policy_stats, settings)
    return results


def account_policies(results: dict, configs: list[Config], policy_stats: dict, settings: BenchSettings) -> None:
    """For each policy and measure: what it skipped (MLPs per token), its ideal speedup, and — from the static probe
    that skips every skippable MLP (the time of one MLP sublayer) and the decisions-only run — the share of the
    skipped MLPs' time that was actually saved and the per-token cost of deciding.

    Times come from the *paired* speedups (each config against the full model in the same round), not from
    differences of medians, so the machine's drift between rounds cancels."""
    costs = CostModel.from_parameter_counts(configs[0].model)
    full = results[FULL]
    for config in configs:
        if config.name not in policy_stats:
            continue
        for measure, stats in policy_stats[config.name].items():
            entry = results[config.name][measure]
            tokens = _tokens_per_call(measure, settings)
            full_s = full[measure]["median_s"] / tokens  # per token

            def saved_by(speedup: float) -> float:  # seconds per token a config saves, from its paired speedup
                return full_s * (1 - 1 / speedup)

            skipped = statistics.mean(s["skipped_mlps_per_token"] for s in stats)
            entry["policy"] = {"skipped_mlps_per_token": skipped,
                               "mlp_skip_ratio": statistics.mean(s["mlp_skip_ratio"] for s in stats),
                               "attention_skip_ratio": statistics.mean(s["attention_skip_ratio"] for s in stats)}
            for key in ("skipped_blocks_per_token", "blocks_skipped_by_every_row"):  # a block-skipping router's
                if all(key in s for s in stats):
                    entry["policy"][key] = statistics.mean(s[key] for s in stats)
            if config.dry_run:  # it skipped nothing; "skipped" is what it would have skipped
                entry["policy"]["decision_overhead_s_per_token"] = -saved_by(entry["speedup"])
                continue
            ideal = [s.get("ideal_speedup") for s in stats]  # a skipper that skips whole blocks says its own
            entry["ideal_speedup"] = (statistics.mean(ideal) if all(v is not None for v in ideal)
                                      else costs.ideal_speedup_of_skipped_mlps(skipped))
            entry["policy"]["saved_s_per_token"] = saved = saved_by(entry["speedup"])
            dry = results.get(f"{config.name} (decisions only)", {}).get(measure)
            if dry is not None:
                entry["policy"]["decision_overhead_s_per_token"] = -saved_by(dry["speedup"])
            probe = results.get(MLP_PROBE, {}).get(measure)
            if probe is not None:
                mlp_s = saved_by(probe["speedup"]) / len(config.plan.skippable)
                entry["policy"].update({
                    "mlp_s": mlp_s,
                    "skipped_mlp_s_per_token": skipped * mlp_s,
                    "saved_share_of_skipped": saved / (skipped * mlp_s) if skipped * mlp_s > 0 else None,
                })


def _tokens_per_call(measure: str, settings: BenchSettings) -> int:
    """Tokens one timed call processes: batch x prompt length (prefill) or batch x decode steps."""
    batch = int(measure.split("_b")[1])
    return batch * (settings.prompt_tokens if measure.startswith("prefill") else settings.new_tokens)


def summarize(configs: list[Config], samples: dict, settings: BenchSettings) -> dict:
    """Medians per configuration; speedups are paired: the median over rounds of full time / config time in the
    same round (measured back to back), which cancels the machine's slow drift that a ratio of medians keeps."""
    results = {}
    full = samples[FULL]
    for config in configs:
        per_measure = {}
        for measure, values in samples[config.name].items():
            median = statistics.median(values)
            batch = int(measure.split("_b")[1])
            if measure.startswith("prefill"):
                throughput = batch * settings.prompt_tokens / median
                ideal = config.ideal_prefill
            else:
                throughput = batch * settings.new_tokens / median
                ideal = config.ideal_decode
            per_measure[measure] = {
                "median_s": median,
                "samples_s": values,
                "tokens_per_s": throughput,
                "speedup": statistics.median(ratios := [f / v for f, v in zip(full[measure], values)]),
                "speedup_ci95": bootstrap_median_ci(ratios),
                "speedup_of_medians": statistics.median(full[measure]) / median,
                "ideal_speedup": ideal,
            }
        results[config.name] = per_measure
    return results


def bootstrap_median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of ``values`` (seeded: the same samples give the same interval)."""
    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def total_work(configs: list[Config], settings: BenchSettings) -> int:
    return (settings.warmup + settings.repeats) * len(configs) * len(settings.measures())
