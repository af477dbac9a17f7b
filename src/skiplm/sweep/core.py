"""The scoreboard sweep: every planning method at every target, measured for quality and speed against the full model,
in one run that survives interruption.

Per *point* (a method at a target; plus the full model as the baseline point) one run measures:

* **perplexity** on a held-out corpus, the plan's decode skip set applied to every token (:mod:`skiplm.measure.perplexity`);
* **generation agreement** with the full model's greedy output on the same prompts and batches
  (:mod:`skiplm.measure.agreement`); the full model's reference is generated once per run;
* **speed**: prefill latency and decode throughput at each batch size, the plan timed interleaved with the full model
  in the same :func:`skiplm.measure.speed.run_bench` call, so its ratios are paired within the point and stay valid however
  far apart in time two points are measured.

The full-model point compares the full model with itself: its agreement is the batch determinism of greedy decoding
(100% on a deterministic backend) and its speed ratios are an A/A measurement, the noise floor of the others.

Resuming. Each finished point is appended to ``OUT/points.jsonl`` as one line the moment it is done, and each plan is
saved to ``OUT/plans/METHOD-TARGET.json`` as soon as it is made. Running the same sweep again loads finished points
and saved plans instead of recomputing them. Every point records the settings that affect its numbers (model
identity, dtype, device, threads, the token ids it was measured on, and the measurement settings) and a hash of them;
a point or plan whose settings differ from the current run's is never reused silently: the run refuses and names the
changed settings, and ``fresh=True`` (``--fresh``) discards the old results.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..measure.agreement import (FULL, Prompt, answer_agreement, answers_agree, encode_prompts, eos_token_ids, extract_answer,
                        greedy_continuations, load_prompts, summarize, token_agreement)
from ..measure.speed import BenchSettings, Config, run_bench, total_work
from .compare import METHODS, POLICY_METHODS, make_plans
from ..measure.costs import CostModel
from ..models.data import corpus_label, load_corpus
from ..errors import PlanError, SweepError
from ..measure.perplexity import compare_perplexity, tokenize_corpus, windows
from ..plan import SkipPlan, model_identity
from ..planners import get_planner
from ..planners.common import load_calibration
from ..policies.core import FORMAT_NAME as POLICY_FORMAT, is_policy
from ..skipper import load_skipper

POINTS_FILE = "points.jsonl"
PLANS_FOLDER = "plans"
RESULT_JSON = "sweep.json"
RESULT_MARKDOWN = "sweep.md"
RESULT_PLOT = "pareto.png"
FULL_TARGET = 1.0


# -- settings -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What a sweep measures and how. ``bench`` holds the speed settings (batch sizes, lengths, repeats)."""

    methods: tuple[str, ...]
    targets: tuple[float, ...]
    corpus: str = "pydoc"  # held-out perplexity text
    tokens: int = 4096
    context: int = 1024
    stride: int = 512
    prompts: str = "gsm8k"  # agreement prompts
    limit: int = 16
    agree_tokens: int = 64
    agree_batch_size: int = 8
    chat: bool = True
    calibration_corpus: str = "gsm8k"
    sequences: int = 2
    length: int = 512
    bench: BenchSettings = BenchSettings()
    seed: int = 0

    def check(self) -> None:
        """Refuse bad settings before anything expensive runs."""
        if not self.methods:
            raise SweepError("no methods to sweep: pass --methods, e.g. uniform,greedy-loss,search.")
        unknown = [m for m in self.methods if m not in METHODS and m not in POLICY_METHODS]
        if unknown:
            raise SweepError(f"unknown method(s) {', '.join(unknown)}; available: "
                             f"{', '.join([*METHODS, *POLICY_METHODS])}.")
        if len(set(self.methods)) != len(self.methods):
            raise SweepError(f"a method is listed twice in {', '.join(self.methods)}.")
        if not self.targets:
            raise SweepError("no targets to sweep: pass --targets, e.g. 1.1,1.2,1.3.")
        bad = [t for t in self.targets if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 1.0)]
        if bad:
            raise SweepError(f"target speedups must be greater than 1, got {', '.join(map(str, bad))}.")
        if len({target_label(t) for t in self.targets}) != len(self.targets):
            raise SweepError(f"a target is listed twice in {', '.join(map(target_label, self.targets))}.")
        positive = {"--tokens": self.tokens, "--limit": self.limit, "--agree-tokens": self.agree_tokens,
                    "--sequences": self.sequences, "--length": self.length, "--repeats": self.bench.repeats,
                    "--prompt-tokens": self.bench.prompt_tokens, "--new-tokens": self.bench.new_tokens,
                    "--decode-prompt-tokens": self.bench.decode_prompt_tokens}
        for option, value in positive.items():
            if value < 1:
                raise SweepError(f"{option} must be at least 1, got {value}.")
        if self.bench.warmup < 0:
            raise SweepError(f"--warmup must be 0 or more, got {self.bench.warmup}.")
        if not self.bench.batch_sizes or min(self.bench.batch_sizes) < 1:
            raise SweepError(f"batch sizes must be positive integers, got {self.bench.batch_sizes}.")
        if not 0 < self.stride < self.context:
            raise SweepError(f"--stride must be in 1..{self.context - 1} (less than --context {self.context}), "
                             f"got {self.stride}.")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["methods"], data["targets"] = list(self.methods), list(self.targets)
        data["bench"]["batch_sizes"] = list(self.bench.batch_sizes)
        return data


def target_label(target: float) -> str:
    """A target as written in file names and tables: 1.1, 1.25."""
    return f"{float(target):g}"


def point_key(method: str, target: float) -> tuple[str, str]:
    return method, target_label(target)


def plan_file_name(method: str, target: float) -> str:
    return f"{method}-{target_label(target)}.json"


def is_data_driven(method: str) -> bool:
    if method in POLICY_METHODS:
        return True  # calibrated on the calibration text
    return getattr(get_planner(METHODS[method][0]), "calibration_defaults", None) is not None


def settings_hash(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _token_hash(values: Any) -> str:
    if isinstance(values, torch.Tensor):
        data = values.to(torch.int64).cpu().numpy().tobytes()
    else:
        data = json.dumps(values, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


# -- the points file ----------------------------------------------------------------------------------------------------
def load_points(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished points by (method, target label). A last line cut short by an interrupted write is dropped (and removed
    from the file, so the next append starts on a fresh line); any other unreadable line is an error."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1].strip():  # no final newline: the last write did not finish
        keep = b"".join(line + b"\n" for line in lines[:-1])
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(keep)
        os.replace(temporary, path)
    points = {}
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SweepError(f"{path}, line {number} is not a JSON record: the file was edited or damaged. Delete that "
                             "line, or pass --fresh to start the sweep over.") from None
        if not isinstance(record, dict) or not {"method", "target", "settings_hash"} <= set(record):
            raise SweepError(f"{path}, line {number} is not a sweep point (it needs method, target and settings_hash); "
                             "pass --fresh to start the sweep over, or use another output folder.")
        points[point_key(record["method"], record["target"])] = record
    return points


def append_point(path: Path, record: dict[str, Any]) -> None:
    """Append one finished point as one line, flushed to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(line):
            written += os.write(descriptor, line[written:])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Readable differences between two settings dicts: ``"perplexity.tokens: 2048 -> 4096"``."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{where}.{key}" if where else str(key)
            if key not in old or key not in new:
                found.append(f"{name}: {'absent' if key not in old else _short(old[key])} -> "
                             f"{'absent' if key not in new else _short(new[key])}")
            else:
                found += differences(old[key], new[key], name)
        return found
    if old != new:
        return [f"{where}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else "(changed)"


# -- progress -----------------------------------------------------------------------------------------------------------
class SweepProgress:
    """What a sweep reports while it runs; the CLI draws it with rich. Every method is optional to override."""

    def planning(self, text: str) -> None:
        """Planning is under way (``text`` says what)."""

    def start(self, total_steps: int, points: int, resumed: int) -> None:
        """Measuring starts: ``points`` points to measure in ``total_steps`` steps; ``resumed`` loaded from disk."""

    def step(self, description: str, steps: int = 1) -> None:
        """``steps`` more steps of measuring are done."""

    def finished(self, record: dict[str, Any]) -> None:
        """A point is finished and saved."""


# -- measurements -------------------------------------------------------------------------------------------------------
def measure_perplexity(model: nn.Module, plan: SkipPlan | None, ids: torch.Tensor, *, context: int, stride: int,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Held-out perplexity under ``plan`` (None: the full model), its decode skip set applied to every token."""
    return compare_perplexity(model, ids, {"point": plan}, context=context, stride=stride,
                              progress=progress)["point"].to_json()


def generate(model: nn.Module, plan: SkipPlan | None, prompts: "AgreementInputs",
             progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of the prompts under ``plan`` (None: the full model), in input order. Prompts are
    batched by length, the same batches for every configuration (so padding is the same as the reference's)."""
    from ..skipper import apply

    ordered = [prompts.encoded[i] for i in prompts.order]
    kwargs = dict(new_tokens=prompts.new_tokens, eos_ids=prompts.eos_ids, pad_token_id=prompts.pad_token_id,
                  batch_size=prompts.batch_size, progress=progress)
    if plan is None:
        out_sorted = greedy_continuations(model, ordered, **kwargs)
    else:
        with apply(model, plan, check_model=False):
            out_sorted = greedy_continuations(model, ordered, **kwargs)
    outputs: list[list[int]] = [[] for _ in prompts.encoded]
    for position, index in enumerate(prompts.order):
        outputs[index] = out_sorted[position]
    return outputs


def agreement_summary(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]],
                      prompts: "AgreementInputs", tokenizer) -> dict[str, Any]:
    """How ``candidate`` outputs agree with the full model's ``reference`` (see :mod:`skiplm.measure.agreement`)."""
    agreements = [token_agreement(ref, cand) for ref, cand in zip(reference, candidate)]
    summary: dict[str, Any] = summarize(agreements)
    def answers_of(outputs: Sequence[Sequence[int]]) -> list[str | None]:
        return [extract_answer(tokenizer.decode(list(o), skip_special_tokens=True)) for o in outputs]

    reference_answers, answers = answers_of(reference), answers_of(candidate)
    summary["answer_agreement"], summary["answer_compared_prompts"] = answer_agreement(answers, reference_answers)
    summary["stopped_at_eos"] = sum(bool(o) and o[-1] in prompts.eos_ids for o in candidate) / len(candidate)
    graded = [i for i, p in enumerate(prompts.prompts) if p.answer is not None]
    if graded:
        summary["graded_prompts"] = len(graded)
        summary["accuracy"] = sum(answers_agree(answers[i], prompts.prompts[i].answer) for i in graded) / len(graded)
    summary["per_prompt"] = [
        {"first_divergence": a.first_divergence, "length": a.candidate_length, "answer": answer}
        for a, answer in zip(agreements, answers)
    ]
    return summary


def measure_speed(model: nn.Module, plan: SkipPlan | None, corpus_ids: torch.Tensor, settings: BenchSettings,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prefill and decode timing of ``plan`` (None: the full model again, an A/A measurement) paired with the full
    model in one :func:`~skiplm.measure.speed.run_bench` call. Returns run_bench's result, configurations ``full`` and
    ``plan``."""
    costs = CostModel.from_parameter_counts(model)
    candidate = Config("plan", model)
    if is_policy(plan):  # its ideal speedup comes from what it skipped while timed
        candidate = Config("plan", model, plan)
    elif plan is not None:
        candidate = Config("plan", model, plan, costs.ideal_speedup(plan.decode), costs.ideal_speedup(plan.prefill))
    return run_bench([Config("full", model), candidate], corpus_ids, settings, progress)


@dataclasses.dataclass
class AgreementInputs:
    prompts: list[Prompt]
    encoded: list[list[int]]
    order: list[int]  # prompt indices sorted by length: the batching order
    eos_ids: list[int]
    pad_token_id: int
    new_tokens: int
    batch_size: int

    @property
    def batches(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)


# -- the sweep ----------------------------------------------------------------------------------------------------------
class Sweep:
    """One sweep of a model into an output folder. :meth:`run` plans what is missing, measures every unfinished
    point (saving each as soon as it is done) and writes the results."""

    def __init__(self, model: nn.Module, tokenizer, settings: SweepSettings, out: str | Path, *, model_name: str,
                 dtype: str = "float32", device: str = "cpu", command: str | None = None, fresh: bool = False):
        settings.check()
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.out = Path(out)
        self.model_name, self.dtype, self.device, self.command, self.fresh = model_name, dtype, device, command, fresh
        self.points_path = self.out / POINTS_FILE
        self.plans_dir = self.out / PLANS_FOLDER
        self._reference: list[list[int]] | None = None

    # -- inputs and what identifies a result
    def _prepare(self) -> None:
        s = self.settings
        torch.manual_seed(s.seed)
        self.eval_ids = tokenize_corpus(self.tokenizer, load_corpus(s.corpus), s.tokens)
        prompts = load_prompts(s.prompts, s.limit)
        encoded = encode_prompts(self.tokenizer, prompts, chat=s.chat)
        eos_ids = eos_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_ids[0]
        self.agreement = AgreementInputs(prompts, encoded, sorted(range(len(encoded)), key=lambda i: len(encoded[i])),
                                         eos_ids, pad, s.agree_tokens, s.agree_batch_size)
        longest = max(s.bench.prompt_tokens, s.bench.decode_prompt_tokens)
        self.corpus_ids = tokenize_corpus(self.tokenizer, load_corpus("gsm8k"), max(s.bench.batch_sizes) * longest)
        self.calibration = None
        if any(is_data_driven(m) for m in s.methods):
            self.calibration = load_calibration(self.tokenizer, s.calibration_corpus, s.sequences, s.length)
        identity = model_identity(self.model).to_json()
        identity.pop("name")  # a folder moved elsewhere is the same model
        self.common = {
            "model": identity,
            "dtype": self.dtype,
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "seed": s.seed,
            "perplexity": {"corpus": corpus_label(s.corpus), "tokens": s.tokens, "context": s.context,
                           "stride": s.stride, "token_ids": _token_hash(self.eval_ids)},
            "agreement": {"prompts": corpus_label(s.prompts), "limit": s.limit, "new_tokens": s.agree_tokens,
                          "batch_size": s.agree_batch_size, "chat": s.chat, "token_ids": _token_hash(encoded)},
            "speed": {**_bench_settings(s.bench), "token_ids": _token_hash(self.corpus_ids)},
        }

    def plan_settings(self, method: str) -> dict[str, Any]:
        """What a plan of ``method`` depends on."""
        settings = {key: self.common[key] for key in ("model", "dtype", "device")}
        settings["method"] = method
        if is_data_driven(method):
            settings["calibration"] = {"corpus": self.calibration.source, "sequences": self.settings.sequences,
                                       "length": self.settings.length,
                                       "token_ids": _token_hash([batch.tolist() for batch in self.calibration])}
        return settings

    def point_settings(self, method: str) -> dict[str, Any]:
        """What a point's numbers depend on: the common settings, and its plan's (none for the full model)."""
        if method == FULL:
            return dict(self.common)
        return {**self.common, "plan": self.plan_settings(method)}

    # -- the run
    def run(self, progress: SweepProgress | None = None) -> dict[str, Any]:
        progress = progress or SweepProgress()
        started = time.perf_counter()
        started_at = _now()
        self._prepare()
        if self.fresh:
            self._discard()
        keys = [(FULL, FULL_TARGET)] + [(m, t) for m in self.settings.methods for t in self.settings.targets]
        finished = load_points(self.points_path)
        self._refuse_stale(finished, keys)
        resumed = sum(point_key(m, t) in finished for m, t in keys)
        plans = self._plans(finished, progress)
        pending = [(m, t) for m, t in keys if point_key(m, t) not in finished]
        total = sum(self._steps(m) for m, _ in pending)
        if pending and pending[0][0] != FULL:
            total += self.agreement.batches  # the full model's reference outputs, generated again for this run
        progress.start(total, len(pending), resumed)
        for method, target in pending:
            record = self._measure(method, target, plans.get(point_key(method, target)), progress)
            append_point(self.points_path, record)
            finished[point_key(method, target)] = record
            progress.finished(record)
        result = self._result([finished[point_key(m, t)] for m, t in keys], resumed, started, started_at)
        write_sweep(result, self.out)
        return result

    def _discard(self) -> None:
        """--fresh: remove the points file and the plans this sweep saved."""
        if self.points_path.exists():
            self.points_path.unlink()
        if self.plans_dir.is_dir():
            for path in self.plans_dir.glob("*.json"):
                path.unlink()

    def _refuse_stale(self, finished: dict, keys: list[tuple[str, float]]) -> None:
        stale = []
        for method, target in keys:
            record = finished.get(point_key(method, target))
            if record is not None and record["settings_hash"] != settings_hash(self.point_settings(method)):
                stale.append((f"{method} @ {target_label(target)}", record.get("settings", {}),
                              self.point_settings(method)))
            plan_path = self.plans_dir / plan_file_name(method, target)
            if method != FULL and record is None and plan_path.exists():
                saved = _read_plan(plan_path).provenance.get("sweep", {})
                if saved.get("settings_hash") != settings_hash(self.plan_settings(method)):
                    stale.append((f"plan {plan_path.name}", saved.get("settings", {}), self.plan_settings(method)))
        if stale:
            changed = sorted({d for _, old, new in stale for d in differences(old, new)})
            raise SweepError(
                f"{self.out} holds results measured with other settings ({len(stale)}: "
                f"{', '.join(name for name, _, _ in stale[:4])}{', ...' if len(stale) > 4 else ''}); changed: "
                f"{'; '.join(changed[:8]) or 'unknown'}. They are not comparable with new ones and are not reused. "
                "Re-run with the same settings to resume, pass --fresh to discard them and start over, or write to "
                "another folder with -o."
            )

    def _plans(self, finished: dict, progress: SweepProgress) -> dict[tuple[str, str], SkipPlan]:
        """A plan for every unfinished point: loaded from OUT/plans, or made now (and saved at once). A target the
        method cannot reach becomes a finished point with an error."""
        plans: dict[tuple[str, str], SkipPlan] = {}
        for method in self.settings.methods:
            missing = []
            for target in self.settings.targets:
                if point_key(method, target) in finished:
                    continue
                path = self.plans_dir / plan_file_name(method, target)
                if path.exists():
                    plan = _read_plan(path)
                    plan.check_model(self.model)
                    plans[point_key(method, target)] = plan
                else:
                    missing.append(target)
            if not missing:
                continue
            progress.planning(f"planning {method} for {', '.join(map(target_label, missing))}")
            plan_settings = self.plan_settings(method)
            for point in make_plans(self.model, [method], missing, self.calibration, progress=progress.planning):
                if point.plan is None:
                    record = self._record(method, point.target, None, error=point.error or "no plan",
                                          seconds_to_plan=point.seconds_to_plan)
                    append_point(self.points_path, record)
                    finished[point_key(method, point.target)] = record
                    continue
                stamp = {"settings_hash": settings_hash(plan_settings), "settings": plan_settings,
                         "seconds_to_plan": point.seconds_to_plan}
                plan = dataclasses.replace(point.plan, provenance={**point.plan.provenance, "sweep": stamp})
                plan.save(self.plans_dir / plan_file_name(method, point.target))
                plans[point_key(method, point.target)] = plan
        return plans

    def _steps(self, method: str) -> int:
        """Progress steps of measuring one point: perplexity windows, generation batches, timing measurements."""
        s = self.settings
        perplexity_steps = len(windows(self.eval_ids.numel(), s.context, s.stride))
        generation = self.agreement.batches * (2 if method == FULL else 1)  # the full point makes the reference
        return perplexity_steps + generation + total_work([None, None], s.bench)

    def _measure(self, method: str, target: float, plan: SkipPlan | None, progress: SweepProgress) -> dict[str, Any]:
        s = self.settings
        label = "full model" if method == FULL else f"{method} @ {target_label(target)}"
        seconds = {}
        start = time.perf_counter()
        ppl = measure_perplexity(self.model, plan, self.eval_ids, context=s.context, stride=s.stride,
                                 progress=lambda scored: progress.step(f"{label}: perplexity"))
        seconds["perplexity"] = time.perf_counter() - start

        start = time.perf_counter()
        def generation_step(rows: int) -> None:
            progress.step(f"{label}: generation")

        if self._reference is None:
            self._reference = generate(self.model, None, self.agreement, generation_step)
        candidate = generate(self.model, plan, self.agreement, generation_step)
        agreement = agreement_summary(self._reference, candidate, self.agreement, self.tokenizer)
        seconds["agreement"] = time.perf_counter() - start

        start = time.perf_counter()
        speed = measure_speed(self.model, plan, self.corpus_ids, s.bench,
                              lambda what: progress.step(f"{label}: timing {what}"))
        seconds["speed"] = time.perf_counter() - start
        seconds_to_plan = (plan.provenance.get("sweep", {}).get("seconds_to_plan") if plan is not None else None)
        return self._record(method, target, plan, perplexity=ppl, agreement=agreement, speed=speed, seconds=seconds,
                            seconds_to_plan=seconds_to_plan)

    def _record(self, method: str, target: float, plan: SkipPlan | None, **fields: Any) -> dict[str, Any]:
        settings = self.point_settings(method)
        record: dict[str, Any] = {"method": method, "target": float(target), "settings_hash": settings_hash(settings),
                                  "settings": settings, "error": None}
        if plan is not None:
            if is_policy(plan):  # what it skips depends on the input: its ideal speedup was measured with its speed
                speed = fields.get("speed", {}).get("plan", {})
                smallest = min(self.settings.bench.batch_sizes)
                ideal = {phase: speed.get(f"{phase}_b{smallest}", {}).get("ideal_speedup")
                         for phase in ("decode", "prefill")}
            else:
                costs = CostModel.from_parameter_counts(self.model)
                ideal = {"decode": costs.ideal_speedup(plan.decode), "prefill": costs.ideal_speedup(plan.prefill)}
            record.update({
                "plan_file": f"{PLANS_FOLDER}/{plan_file_name(method, target)}",
                "description": plan.describe(),
                "plan": plan.to_json(),
                "ideal_speedup": ideal,
            })
        elif method == FULL:
            record.update({"description": "the full model (compared with itself)", "plan": None,
                           "ideal_speedup": {"decode": 1.0, "prefill": 1.0}})
        record.update(fields)
        record["finished_at"] = _now()
        return record

    def _result(self, points: list[dict], resumed: int, started: float, started_at: str) -> dict[str, Any]:
        from ..report.files import machine_info

        machine = machine_info(self.device)
        full = points[0]
        for point in points:
            if "perplexity" in point and "perplexity" in full:
                point["perplexity_ratio"] = point["perplexity"]["perplexity"] / full["perplexity"]["perplexity"]
        return {
            "kind": "sweep",
            "command": self.command,
            "model": self.model_name,
            "dtype": self.dtype,
            "device": self.device,
            "machine": machine,
            "versions": {key: machine[key] for key in ("python", "torch", "transformers", "skiplm")}
                        | {"platform": platform.platform()},
            "seeds": {"torch": self.settings.seed, "bootstrap": 0, "latency_probe": 0,
                      "note": "greedy decoding and perplexity are deterministic; the seeds fix the bootstrap "
                              "intervals of the speed ratios and the latency probes of `search`"},
            "settings": self.settings.to_json(),
            "measured_with": self.common,
            "points": points,
            "resumed_points": resumed,
            "started": started_at,
            "finished": _now(),
            "seconds_this_run": time.perf_counter() - started,
        }


def run_sweep(model: nn.Module, tokenizer, settings: SweepSettings, out: str | Path, *, model_name: str,
              dtype: str = "float32", device: str = "cpu", command: str | None = None, fresh: bool = False,
              progress: SweepProgress | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep into ``out``; returns the result written to ``out/sweep.json``."""
    return Sweep(model, tokenizer, settings, out, model_name=model_name, dtype=dtype, device=device, command=command,
                 fresh=fresh).run(progress)


def _bench_settings(bench: BenchSettings) -> dict[str, Any]:
    """The timing settings a point depends on (a sweep always decodes after corpus text, so that is not named)."""
    settings = {**dataclasses.asdict(bench), "batch_sizes": list(bench.batch_sizes)}
    settings.pop("decode_prompts")
    return settings


def _read_plan(path: Path) -> SkipPlan:
    """A plan or policy file this sweep saved."""
    try:
        return load_skipper(path)
    except PlanError as exc:
        raise SweepError(f"{exc} It was saved by an earlier run of this sweep: delete it to re-plan, or pass --fresh."
                         ) from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- results: table, plot, files ----------------------------------------------------------------------------------------
def speed_measures(result: dict[str, Any]) -> list[str]:
    batch_sizes = result["settings"]["bench"]["batch_sizes"]
    return [f"{kind}_b{b}" for b in batch_sizes for kind in ("prefill", "decode")]


def pareto_measure(result: dict[str, Any]) -> str:
    """The speed on the Pareto plot's x axis: decode at batch 1 (or the smallest batch size measured)."""
    return f"decode_b{min(result['settings']['bench']['batch_sizes'])}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def sweep_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per point (the full model first): plan, perplexity, agreement, and each measured speedup."""
    measures = speed_measures(result)
    headers = ["method", "target", "skipped (decode)", "ideal", "perplexity", "ppl / full", "prefix agreement",
               "exact match", "answer agreement", "accuracy"]
    headers += [f"{m.replace('_b', ' b')}" for m in measures]
    rows = []
    for point in result["points"]:
        full = point["method"] == FULL
        row = [point["method"], "—" if full else target_label(point["target"])]
        if point.get("error"):
            rows.append(row + [f"not planned: {point['error']}"[:80]] + ["—"] * (len(headers) - 3))
            continue
        plan = point.get("plan")
        row.append("nothing" if plan is None else _skipped_cell(plan))
        ideal = point["ideal_speedup"]["decode"]
        row.append("—" if ideal is None else f"{ideal:.3f}x")
        row.append(f"{point['perplexity']['perplexity']:.3f}")
        row.append(f"{point.get('perplexity_ratio', float('nan')):.2f}x")
        a = point["agreement"]
        row += [_percent(a["prefix_agreement"]), _percent(a["exact_match"]), _percent(a["answer_agreement"]),
                _percent(a.get("accuracy"))]
        for measure in measures:
            r = point["speed"]["plan"][measure]
            if full:  # A/A: the full model against itself, and its absolute speed
                row.append(f"{r['tokens_per_s']:.1f} tok/s (A/A {r['speedup']:.2f}x)")
            else:
                low, high = r["speedup_ci95"]
                row.append(f"{r['speedup']:.2f}x ({low:.2f}–{high:.2f})")
        rows.append(row)
    return headers, rows


def compact_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table for a terminal: quality and the measured speedups only (sweep.md has everything)."""
    measures = speed_measures(result)
    headers = ["point", "ppl / full", "prefix agr.", "answer agr."] + [m.replace("_b", " b") for m in measures]
    rows = []
    for point in result["points"]:
        name = "full" if point["method"] == FULL else f"{point['method']} @ {target_label(point['target'])}"
        if point.get("error"):
            rows.append([name, "not planned"] + [""] * (len(headers) - 2))
            continue
        a = point["agreement"]
        rows.append([name, f"{point['perplexity_ratio']:.2f}x", _percent(a["prefix_agreement"]),
                     _percent(a["answer_agreement"])]
                    + [f"{point['speed']['plan'][m]['speedup']:.2f}x" for m in measures])
    return headers, rows


def _skipped_cell(plan: dict[str, Any]) -> str:
    if plan.get("format") == POLICY_FORMAT:
        return plan["description"]
    decode = plan["decode"]
    parts = []
    for key, label in (("blocks", "blocks"), ("attention", "attn"), ("mlp", "mlp")):
        if decode.get(key):
            parts.append(f"{label} {','.join(map(str, decode[key]))}")
    text = "; ".join(parts) or "nothing"
    return text + (" (prefill differs)" if plan["prefill"] != plan["decode"] else "")


def settings_text(result: dict[str, Any]) -> str:
    s = result["settings"]
    b = s["bench"]
    return (
        f"Perplexity: {s['tokens']} tokens of {corpus_label(s['corpus'])}, context {s['context']}, stride {s['stride']}, "
        f"each plan's decode skip set on every token. Agreement: greedy output on the first {s['limit']} prompts of "
        f"{corpus_label(s['prompts'])}{' (chat template)' if s['chat'] else ''}, up to {s['agree_tokens']} tokens, "
        "compared with the full model's on the same batches (prefix agreement: share of the full model's tokens "
        "reproduced before the first divergence; answer agreement: same final number; accuracy: the reference "
        f"answer). Speed: prefill of {b['prompt_tokens']} tokens and {b['new_tokens']} greedy decode steps after a "
        f"{b['decode_prompt_tokens']}-token prompt at batch {', '.join(map(str, b['batch_sizes']))}; each plan timed "
        f"interleaved with the full model in the same run, {b['repeats']} rounds after {b['warmup']} warm-up; "
        "speedup = full time / plan time, median of per-round ratios (95% bootstrap interval). Calibration of the "
        f"data-driven planners: {s['sequences']} x {s['length']} tokens of {corpus_label(s['calibration_corpus'])}. "
        "Targets are each method's own (ideal by the cost model; `search`: predicted by its measured latency model). "
        "The full model's row compares it with itself: agreement is greedy decoding's determinism, speed an A/A "
        "ratio (the noise floor)."
    )


def plot_sweep(result: dict[str, Any], path: Path, title: str) -> Path:
    """Pareto plot: perplexity (ratio to the full model, log) and prefix agreement against measured decode speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    measure = pareto_measure(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_method: dict[str, list[dict]] = {}
    for point in result["points"]:
        if point["method"] != FULL and not point.get("error"):
            by_method.setdefault(point["method"], []).append(point)
    for method, points in by_method.items():
        points.sort(key=lambda p: p["target"])  # a method's curve runs from its smallest target to its largest
        xs = [p["speed"]["plan"][measure]["speedup"] for p in points]
        errors = [[x - p["speed"]["plan"][measure]["speedup_ci95"][0] for x, p in zip(xs, points)],
                  [p["speed"]["plan"][measure]["speedup_ci95"][1] - x for x, p in zip(xs, points)]]
        errors = [[max(e, 0.0) for e in side] for side in errors]
        for axis, ys in ((left, [p["perplexity_ratio"] for p in points]),
                         (right, [100 * p["agreement"]["prefix_agreement"] for p in points])):
            line = axis.errorbar(xs, ys, xerr=errors, marker="o", capsize=2, label=method)
            for x, y, p in zip(xs, ys, points):
                axis.annotate(target_label(p["target"]), (x, y), textcoords="offset points", xytext=(3, 3),
                              fontsize=6, color=line[0].get_color())
    full = result["points"][0]
    aa = full["speed"]["plan"][measure]
    for axis, y in ((left, 1.0), (right, 100 * full["agreement"]["prefix_agreement"])):
        low, high = sorted([*aa["speedup_ci95"], 1.0])[::2]
        axis.axvspan(low, high, color="grey", alpha=0.15, label="full vs itself (A/A: the noise floor)")
        axis.scatter([1.0], [y], marker="*", s=150, color="black", zorder=3, label="full model")
        axis.grid(alpha=0.3)
        axis.set_xlabel(f"measured speedup, {measure.replace('_b', ' batch ')} (x)")
    left.set_yscale("log")
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_ylabel("perplexity / full model's (log)")
    right.set_ylabel("prefix agreement with the full model (%)")
    right.set_ylim(-3, 103)
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_sweep(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """``sweep.json`` (everything), ``sweep.md`` (the table) and ``pareto.png``."""
    from ..report.files import markdown_table, write_json

    out = Path(out)
    json_path = write_json(out / RESULT_JSON, result)
    headers, rows = sweep_table(result)
    machine = result["machine"]
    md = (f"# Scoreboard sweep, {result['model']}\n\n"
          f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}, {result['dtype']} on "
          f"{result['device']}. {settings_text(result)}\n\n" + markdown_table(headers, rows)
          + f"\n![pareto]({RESULT_PLOT})\n\nCommand: `{result.get('command') or 'not recorded'}`\n")
    md_path = out / RESULT_MARKDOWN
    md_path.write_text(md)
    plot_path = plot_sweep(result, out / RESULT_PLOT, f"{result['model']}: quality vs measured speed")
    return {"json": json_path, "markdown": md_path, "plot": plot_path}
