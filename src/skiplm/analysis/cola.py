"""CoLa ("Skip a Layer or Loop it?", 2025): per-sample search over chains of layers that skip or repeat layers.

A *chain* is the sequence of decoder layers a forward pass runs, e.g. ``(0, 1, 1, 3, 5)``: layer 2 and 4 skipped,
layer 1 looped twice. Here a chain keeps the layers' order and gives each layer an action: skip it, run it once, or
run it twice — ``3 ** num_layers`` chains. A Monte Carlo Tree Search (UCT) decides the actions layer by layer;
each visited chain is scored by one forward pass over prompt + reference answer (no KV cache): the log-likelihood of
the answer, and whether the answer is *kept* — every answer token is the chain's argmax given the tokens before it,
i.e. greedy decoding would produce exactly the answer.

Reward: a kept answer scores ``1 + (layers saved) / num_layers`` (shorter is better); an answer not kept scores
``0.5 x exp(mean log-likelihood)`` (< 0.5), which guides the search towards chains that nearly keep it. The search
reports the shortest chain that keeps the answer, and, when the full model does not keep it, any chain that does
(a "fix").

This is an analysis tool, not a runtime: the cost is one forward pass per distinct chain visited (reported as
``evaluations`` and ``seconds``); a chain runs the model's own layer modules in a new order, nothing is copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DataError, PlanError
from ..models.adapters import count_layers, get_adapter, _get_path
from ..models.data import gsm8k_prompts

ACTIONS = (0, 1, 2)  # how many times a layer runs: skip, once, twice


def chain_of(actions: Sequence[int]) -> tuple[int, ...]:
    """The layer sequence of per-layer actions (0: skip, 1: once, 2: twice)."""
    return tuple(layer for layer, times in enumerate(actions) for _ in range(times))


@contextlib.contextmanager
def chained(model: nn.Module, chain: Sequence[int]) -> Iterator[None]:
    """Run ``model`` with its decoder layers replaced by ``chain`` (indices into the original layers; repeats allowed)
    until the block ends. Only for forwards without a KV cache (a repeated layer would share a cache slot)."""
    chain = tuple(int(i) for i in chain)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    if not chain:
        raise PlanError("a chain needs at least one layer.")
    if not all(0 <= i < len(layers) for i in chain):
        raise PlanError(f"chain {chain} names layers outside 0..{len(layers) - 1}.")
    parent_path, _, name = adapter.layers.rpartition(".")
    parent = _get_path(model, parent_path) if parent_path else model
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    saved = {"num_hidden_layers": config.num_hidden_layers}
    if getattr(config, "layer_types", None) is not None:
        saved["layer_types"] = config.layer_types
    setattr(parent, name, nn.ModuleList([layers[i] for i in chain]))
    config.num_hidden_layers = len(chain)
    if "layer_types" in saved:
        config.layer_types = [saved["layer_types"][i] for i in chain]
    try:
        yield
    finally:
        setattr(parent, name, layers)
        for key, value in saved.items():
            setattr(config, key, value)


@dataclasses.dataclass(frozen=True)
class ChainScore:
    chain: tuple[int, ...]
    log_likelihood: float  # of the reference answer, summed over its tokens
    kept: bool  # greedy decoding would produce the answer exactly

    def to_json(self) -> dict[str, Any]:
        return {"chain": list(self.chain), "layers": len(self.chain), "log_likelihood": self.log_likelihood,
                "kept": self.kept}


class ChainScorer:
    """Scores chains on one sample (prompt ids + answer ids), memoised: a chain is run once."""

    def __init__(self, model: nn.Module, prompt_ids: Sequence[int], answer_ids: Sequence[int]):
        if len(prompt_ids) == 0 or len(answer_ids) == 0:
            raise DataError("a CoLa sample needs a non-empty prompt and a non-empty reference answer.")
        self.model = model
        device = next(model.parameters()).device
        self.ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=device)
        self.answer = torch.tensor(list(answer_ids), device=device)
        self.start = len(prompt_ids)
        self.scores: dict[tuple[int, ...], ChainScore] = {}
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, chain: tuple[int, ...]) -> ChainScore:
        if chain not in self.scores:
            started = time.perf_counter()
            with chained(self.model, chain):
                logits = self.model(input_ids=self.ids, use_cache=False).logits[0, self.start - 1:-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            likelihood = float(log_probs.gather(1, self.answer[:, None]).sum())
            kept = bool((logits.argmax(-1) == self.answer).all())
            self.scores[chain] = ChainScore(chain, likelihood, kept)
            self.seconds += time.perf_counter() - started
        return self.scores[chain]


def reward(score: ChainScore, num_layers: int, answer_tokens: int) -> float:
    if score.kept:
        return 1.0 + (num_layers - len(score.chain)) / num_layers
    return 0.5 * math.exp(score.log_likelihood / answer_tokens)


class _Node:
    __slots__ = ("actions", "children", "visits", "total")

    def __init__(self, actions: tuple[int, ...]):
        self.actions = actions
        self.children: dict[int, _Node] = {}
        self.visits = 0
        self.total = 0.0


@dataclasses.dataclass
class ColaResult:
    num_layers: int
    full: ChainScore
    shortest_kept: ChainScore | None
    best: ChainScore  # highest reward seen
    evaluations: int
    iterations: int
    seconds: float
    forward_seconds: float

    @property
    def fixed(self) -> bool:
        """The full model does not keep the answer, and some chain does."""
        return not self.full.kept and self.shortest_kept is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "full": self.full.to_json(),
            "shortest_kept": self.shortest_kept.to_json() if self.shortest_kept else None,
            "best": self.best.to_json(),
            "fixed": self.fixed,
            "evaluations": self.evaluations,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "seconds_per_evaluation": self.forward_seconds / max(self.evaluations, 1),
        }


def search(model: nn.Module, prompt_ids: Sequence[int], answer_ids: Sequence[int], *, iterations: int = 300,
           exploration: float = 0.7, rollout_once: float = 0.7, seed: int = 0,
           progress: Callable[[int, int], None] | None = None) -> ColaResult:
    """MCTS over per-layer actions (skip / once / twice) for one sample; see the module docstring.

    ``rollout_once``: in random completions, the chance that a layer runs once (the rest split between skip and
    twice), so rollouts start near the full model.
    """
    if iterations < 1:
        raise PlanError(f"iterations must be at least 1, got {iterations}.")
    num_layers = count_layers(model)
    scorer = ChainScorer(model, prompt_ids, answer_ids)
    answer_tokens = len(answer_ids)
    rng = random.Random(seed)
    started = time.perf_counter()
    full = scorer(tuple(range(num_layers)))
    root = _Node(())
    best = full

    def rollout(actions: tuple[int, ...]) -> tuple[int, ...]:
        rest = []
        for _ in range(num_layers - len(actions)):
            draw = rng.random()
            rest.append(1 if draw < rollout_once else (0 if draw < (1 + rollout_once) / 2 else 2))
        return actions + tuple(rest)

    for iteration in range(iterations):
        node, path = root, [root]
        while len(node.actions) < num_layers and len(node.children) == len(ACTIONS):  # select (UCT)
            node = max(node.children.values(), key=lambda child: child.total / child.visits + exploration * math.sqrt(
                math.log(node.visits) / child.visits))
            path.append(node)
        if len(node.actions) < num_layers:  # expand one untried action
            action = rng.choice([a for a in ACTIONS if a not in node.children])
            child = _Node(node.actions + (action,))
            node.children[action] = child
            node = child
            path.append(node)
        actions = rollout(node.actions)
        chain = chain_of(actions)
        if not chain:  # every layer skipped: nothing to run
            value = 0.0
        else:
            score = scorer(chain)
            value = reward(score, num_layers, answer_tokens)
            if value > reward(best, num_layers, answer_tokens):
                best = score
        for visited in path:  # back-propagate
            visited.visits += 1
            visited.total += value
        if progress:
            progress(iteration + 1, iterations)
    kept = [s for s in scorer.scores.values() if s.kept]
    shortest = min(kept, key=lambda s: (len(s.chain), -s.log_likelihood)) if kept else None
    return ColaResult(num_layers, full, shortest, best, len(scorer.scores), iterations,
                      time.perf_counter() - started, scorer.seconds)


# -- samples ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sample:
    """A prompt (token ids) and the reference answer it should lead to (token ids), with readable text."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    question: str
    answer: str


def gsm8k_final_answer_samples(tokenizer, limit: int, *, chat: bool = True) -> list[Sample]:
    """GSM8K problems with their worked solution given: the model must state the final number after "#### ".
    The reasoning is in the prompt, so the answer is short (a few tokens) and right or wrong."""
    samples = []
    for prompt in gsm8k_prompts(None):
        if len(samples) == limit:
            break
        solution = prompt.reference
        if not solution or "####" not in solution:
            continue
        reasoning, final = solution.rsplit("####", 1)
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # GSM8K's calculator annotations
        final = final.strip()
        lead = f"{reasoning}\n#### "
        if chat and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                                 tokenize=False) + lead
        else:
            text = f"Question: {prompt.text}\nAnswer: {lead}"
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(final, add_special_tokens=False)["input_ids"]
        samples.append(Sample(tuple(prompt_ids), tuple(answer_ids), prompt.text, final))
    if not samples:
        raise DataError("no GSM8K problem with a '#### answer' solution was found in the shipped data.")
    return samples


# -- a search per problem, and what they add up to -----------------------------------------------------------------------
def search_problems(model: nn.Module, samples: Sequence[Sample], *, iterations: int = 300, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """:func:`search` on every sample; returns ``{"summary": ..., "problems": [...]}`` (JSON-ready): per problem its
    question, answer and search result, and over all problems how often the full model was right, how often a
    shorter chain kept a right answer, and how often a chain fixed a wrong one. ``progress(done, total)`` counts
    MCTS iterations over all samples."""
    problems = []
    started = time.perf_counter()
    for index, sample in enumerate(samples):
        def report(done: int, _: int, index: int = index) -> None:
            if progress:
                progress(index * iterations + done, len(samples) * iterations)

        result = search(model, sample.prompt_ids, sample.answer_ids, iterations=iterations, seed=seed,
                        progress=report)
        problems.append({"question": sample.question, "answer": sample.answer,
                         "prompt_tokens": len(sample.prompt_ids), **result.to_json()})
    return {"summary": summarize_problems(problems, time.perf_counter() - started), "problems": problems}


def summarize_problems(problems: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """What the per-problem searches (their JSON records) add up to."""
    right = [p for p in problems if p["full"]["kept"]]
    wrong = [p for p in problems if not p["full"]["kept"]]
    found = [p["shortest_kept"] for p in problems if p["shortest_kept"] is not None]
    return {
        "problems": len(problems),
        "full_model_right": len(right),
        "right_with_a_shorter_chain": sum(p["shortest_kept"] is not None and p["shortest_kept"]["layers"] < p["num_layers"]
                                          for p in right),
        "wrong_fixed_by_a_chain": sum(p["fixed"] for p in wrong),
        "mean_layers_of_shortest_chain": sum(s["layers"] for s in found) / max(1, len(found)),
        "evaluations": sum(p["evaluations"] for p in problems),
        "seconds": seconds,
    }
