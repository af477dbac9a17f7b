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

Task accuracy (optional, ``tasks=``; ``--tasks``). Each point is also scored on skiplm's offline lm-evaluation-harness
tasks (GSM8K exact match, GPQA Diamond accuracy), the first ``task_limit`` examples of each, in process on the model
already loaded (:func:`skiplm.integrations.lm_eval.score_task`); per task the point records the accuracy, its standard
error, each example's score, and the settings it was measured with (under ``"tasks"``). A point's other numbers do not
depend on them: asking for tasks on a finished sweep scores only the tasks of its finished points (and appends the
completed record to ``points.jsonl``, whose last line per point counts); a task result measured with other task
settings (another ``task_limit``, say) is refused like any stale result.

Healed points. Heal folders (``skiplm heal``; ``healed=`` by name) are measured as points beside the planned ones,
each at :func:`~.measurements.healed_target` and marked ``"healed": true``; their settings include a hash of the
heal record, so a changed heal folder is never reused silently either.

Resuming. Each finished point is appended to ``OUT/points.jsonl`` as one line the moment it is done, and each plan is
saved to ``OUT/plans/METHOD-TARGET.json`` as soon as it is made. Running the same sweep again loads finished points
and saved plans instead of recomputing them. Every point records the settings that affect its numbers (model
identity, dtype, device, threads, the token ids it was measured on, and the measurement settings) and a hash of them;
a point or plan whose settings differ from the current run's is never reused silently: the run refuses and names the
changed settings, and ``fresh=True`` (``--fresh``) discards the old results.

This module runs a sweep; :mod:`.settings` holds its settings and the points file, :mod:`.measurements` what is
measured at a point, :mod:`.tables` the tables and files of the results.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PlanError, SweepError
from ..files import check_output
from ..integrations.tasks import offline_task
from ..measure.agreement import encode_prompts, eos_token_ids, load_prompts
from ..measure.perplexity import tokenize_corpus, windows
from ..measure.speed import BenchSettings, total_work
from ..models.data import corpus_label, load_corpus
from ..plan import model_identity
from ..planners.common import load_calibration
from ..report.files import machine_info
from ..skipper import Skipper, is_healed, load_skipper
from .compare import is_data_driven, make_plans
from .measurements import (AgreementInputs, agreement_summary, generate, healed_target, ideal_speedups,
                           measure_perplexity, measure_speed, measure_task)
from .settings import (FULL_TARGET, PLANS_FOLDER, POINTS_FILE, SweepSettings, append_point, differences, load_points,
                       plan_file_name, point_key, settings_hash, target_label, token_hash)
from .tables import write_sweep


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


# -- the sweep ----------------------------------------------------------------------------------------------------------
class Sweep:
    """One sweep of a model into an output folder. :meth:`run` plans what is missing, measures every unfinished
    point (saving each as soon as it is done) and writes the results. ``healed``: heal folders by point name
    (:func:`skiplm.heal.load_healed`), measured as points too."""

    def __init__(self, model: nn.Module, tokenizer, settings: SweepSettings, out: str | Path, *, model_name: str,
                 dtype: str = "float32", device: str = "cpu", command: str | None = None, fresh: bool = False,
                 healed: dict[str, Skipper] | None = None):
        settings.check()
        out = check_output(out, kind="folder", what="sweep output folder")  # before minutes of planning
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.out = Path(out)
        self.model_name, self.dtype, self.device, self.command, self.fresh = model_name, dtype, device, command, fresh
        self.points_path = self.out / POINTS_FILE
        self.plans_dir = self.out / PLANS_FOLDER
        self._reference: list[list[int]] | None = None
        self._task_manager: Any = None  # lm-eval's, made on the first task scored and reused for every point
        clash = sorted(set(healed or {}) & set(settings.methods))
        if clash:
            raise SweepError(f"a heal folder's point may not take a method's name ({', '.join(clash)}).")
        self.healed = dict(healed or {})

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
            self.calibration = load_calibration(self.tokenizer, s.calibration_corpus, s.sequences, s.length,
                                                model=self.model)
        identity = model_identity(self.model).to_json()
        identity.pop("name")  # a folder moved elsewhere is the same model
        self.common = {
            "model": identity,
            "dtype": self.dtype,
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "seed": s.seed,
            "perplexity": {"corpus": corpus_label(s.corpus), "tokens": s.tokens, "context": s.context,
                           "stride": s.stride, "token_ids": token_hash(self.eval_ids)},
            "agreement": {"prompts": corpus_label(s.prompts), "limit": s.limit, "new_tokens": s.agree_tokens,
                          "batch_size": s.agree_batch_size, "chat": s.chat, "token_ids": token_hash(encoded)},
            "speed": {**_bench_settings(s.bench), "token_ids": token_hash(self.corpus_ids)},
        }
        self.tasks = s.task_names()
        self.task_fingerprints = {task: offline_task(task).fingerprint() for task in self.tasks}
        self.lm_eval_version = _lm_eval_version() if self.tasks else None

    def plan_settings(self, method: str) -> dict[str, Any]:
        """What a plan of ``method`` depends on."""
        settings = {key: self.common[key] for key in ("model", "dtype", "device")}
        settings["method"] = method
        if is_data_driven(method):
            settings["calibration"] = {"corpus": self.calibration.source, "sequences": self.settings.sequences,
                                       "length": self.settings.length,
                                       "token_ids": token_hash([batch.tolist() for batch in self.calibration])}
        return settings

    def point_settings(self, method: str | None) -> dict[str, Any]:
        """What a point's numbers depend on: the common settings, and its plan's (none for the full model, method
        None; a heal folder's point: its heal record)."""
        if method is None:
            return dict(self.common)
        if method in self.healed:
            return {**self.common, "heal": {"record": settings_hash(self.healed[method].to_json())}}
        return {**self.common, "plan": self.plan_settings(method)}

    def task_settings(self, method: str | None, task: str) -> dict[str, Any]:
        """What a point's accuracy on ``task`` depends on: the point's own settings (by their hash), the task (its task
        file and data, by a hash), how many examples, how they were batched, and the harness's version."""
        s = self.settings
        settings = {"point": settings_hash(self.point_settings(method)), "task": task,
                    "task_fingerprint": self.task_fingerprints[task], "limit": s.task_limit,
                    "batch_size": s.task_batch_size, "lm_eval": self.lm_eval_version}
        if offline_task(task).generative:
            settings["max_tokens"] = s.task_max_tokens
        return settings

    def _missing_tasks(self, record: dict[str, Any]) -> list[str]:
        """The tasks of this run a finished point has no result for (none for a point that could not be planned)."""
        if record.get("error"):
            return []
        return [task for task in self.tasks if task not in record.get("tasks", {})]

    # -- the run
    def run(self, progress: SweepProgress | None = None) -> dict[str, Any]:
        progress = progress or SweepProgress()
        started = time.perf_counter()
        started_at = _now()
        self._prepare()
        if self.fresh:
            self._discard()
        healed_keys = {(name, healed_target(self.model, skipper)): skipper for name, skipper in self.healed.items()}
        keys = [(None, FULL_TARGET)] + [(m, t) for m in self.settings.methods for t in self.settings.targets]
        keys += list(healed_keys)
        finished = load_points(self.points_path)
        self._refuse_stale(finished, keys)
        resumed = sum(point_key(m, t) in finished for m, t in keys)
        plans = self._plans(finished, progress)
        plans.update({point_key(m, t): skipper for (m, t), skipper in healed_keys.items()})
        pending = [(m, t) for m, t in keys if point_key(m, t) not in finished]
        tasks_only = [(m, t) for m, t in keys
                      if (m, t) not in pending and self._missing_tasks(finished[point_key(m, t)])]
        total = sum(self._steps(m) for m, _ in pending)
        total += sum(len(self._missing_tasks(finished[point_key(m, t)])) for m, t in tasks_only)
        if pending and pending[0][0] is not None:
            total += self.agreement.batches  # the full model's reference outputs, generated again for this run
        progress.start(total, len(pending) + len(tasks_only), resumed)
        for method, target in [key for key in keys if key in pending or key in tasks_only]:
            key = point_key(method, target)
            if key in finished:  # measured before: only the tasks it lacks
                record = self._add_tasks(finished[key], method, target, plans.get(key), progress)
            else:
                record = self._measure(method, target, plans.get(key), progress)
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
            elif record is not None:
                for task in self.tasks:
                    done = record.get("tasks", {}).get(task)
                    if done is not None and done["settings_hash"] != settings_hash(self.task_settings(method, task)):
                        stale.append((f"{task} of {method} @ {target_label(target)}",
                                      {"tasks": {task: done.get("settings", {})}},
                                      {"tasks": {task: self.task_settings(method, task)}}))
            plan_path = self.plans_dir / plan_file_name(method, target)
            if method not in (None, *self.healed) and record is None and plan_path.exists():
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

    def _plans(self, finished: dict, progress: SweepProgress) -> dict[tuple[str, str], Skipper]:
        """A plan for every unfinished point: loaded from OUT/plans, or made now (and saved at once). A target the
        method cannot reach becomes a finished point with an error."""
        plans: dict[tuple[str, str], Skipper] = {}
        for method in self.settings.methods:
            missing = []
            for target in self.settings.targets:
                record = finished.get(point_key(method, target))
                if record is not None:
                    if self._missing_tasks(record):  # finished, but to be scored on tasks: with the plan it ran
                        plans[point_key(method, target)] = self._finished_plan(record)
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

    def _finished_plan(self, record: dict[str, Any]) -> Skipper:
        """The plan a finished point was measured with, from the file this sweep saved (checked against the record)."""
        path = self.out / record.get("plan_file", "")
        if not record.get("plan_file") or not path.is_file():
            raise SweepError(f"the plan of {record['method']} @ {target_label(record['target'])} ({path}) is missing; "
                             "scoring --tasks at that finished point needs it. Pass --fresh to start the sweep over.")
        plan = _read_plan(path)
        if plan.to_json() != record.get("plan"):
            raise SweepError(f"{path} is not the plan {record['method']} @ {target_label(record['target'])} was "
                             "measured with (the file was changed). Pass --fresh to start the sweep over.")
        plan.check_model(self.model)
        return plan

    def _steps(self, method: str | None) -> int:
        """Progress steps of measuring one point: perplexity windows, generation batches, timing measurements, and
        one per task."""
        s = self.settings
        perplexity_steps = len(windows(self.eval_ids.numel(), s.context, s.stride))
        generation = self.agreement.batches * (2 if method is None else 1)  # the full point makes the reference
        return perplexity_steps + generation + total_work([None, None], s.bench) + len(self.tasks)

    def _measure(self, method: str | None, target: float, plan: Skipper | None,
                 progress: SweepProgress) -> dict[str, Any]:
        s = self.settings
        label = "full model" if method is None else f"{method} @ {target_label(target)}"
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
        fields: dict[str, Any] = {"perplexity": ppl, "agreement": agreement, "speed": speed, "seconds": seconds,
                                  "seconds_to_plan": seconds_to_plan}
        if self.tasks:
            fields["tasks"] = self._score_tasks(method, target, plan, self.tasks, progress)
        return self._record(method, target, plan, **fields)

    def _add_tasks(self, record: dict[str, Any], method: str | None, target: float, plan: Skipper | None,
                   progress: SweepProgress) -> dict[str, Any]:
        """A finished point's record with the tasks of this run it lacked scored and added."""
        scored = self._score_tasks(method, target, plan, self._missing_tasks(record), progress)
        return {**record, "tasks": {**record.get("tasks", {}), **scored}}

    def _score_tasks(self, method: str | None, target: float, plan: Skipper | None, tasks: list[str] | tuple[str, ...],
                     progress: SweepProgress) -> dict[str, dict[str, Any]]:
        """Each task's accuracy under ``plan`` (None: the full model), with the settings it was measured with."""
        from ..integrations.lm_eval import offline_task_manager

        if self._task_manager is None:
            self._task_manager = offline_task_manager()
        s = self.settings
        label = "full model" if method is None else f"{method} @ {target_label(target)}"
        results = {}
        for task in tasks:
            progress.step(f"{label}: {task}", steps=0)
            settings = self.task_settings(method, task)
            start = time.perf_counter()
            result = measure_task(self.model, self.tokenizer, plan, task, limit=s.task_limit,
                                  batch_size=s.task_batch_size, max_tokens=s.task_max_tokens,
                                  task_manager=self._task_manager)
            results[task] = {**result, "seconds": time.perf_counter() - start, "finished_at": _now(),
                             "settings_hash": settings_hash(settings), "settings": settings}
            progress.step(f"{label}: {task}")
        return results

    def _record(self, method: str | None, target: float, plan: Skipper | None, **fields: Any) -> dict[str, Any]:
        settings = self.point_settings(method)
        label, _ = point_key(method, target)
        record: dict[str, Any] = {"method": label, "target": float(target), "settings_hash": settings_hash(settings),
                                  "settings": settings, "error": None}
        if plan is not None:
            fixed = ideal_speedups(self.model, plan)
            if fixed is None:  # what it skips depends on the input: its ideal speedup was measured with its speed
                speed = fields.get("speed", {}).get("plan", {})
                smallest = min(self.settings.bench.batch_sizes)
                ideal = {phase: speed.get(f"{phase}_b{smallest}", {}).get("ideal_speedup")
                         for phase in ("decode", "prefill")}
            else:
                ideal = dict(zip(("decode", "prefill"), fixed))
            if is_healed(plan):
                record["healed"] = True  # a heal folder's point: not a plan this sweep made (its record is in "plan")
            else:
                record["plan_file"] = f"{PLANS_FOLDER}/{plan_file_name(method, target)}"
            record.update({
                "description": plan.describe(),
                "plan": plan.to_json(),
                "ideal_speedup": ideal,
            })
        elif method is None:
            record.update({"description": "the full model (compared with itself)", "plan": None,
                           "ideal_speedup": {"decode": 1.0, "prefill": 1.0}})
        record.update(fields)
        record["finished_at"] = _now()
        return record

    def _result(self, points: list[dict], resumed: int, started: float, started_at: str) -> dict[str, Any]:
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
              healed: dict[str, Skipper] | None = None, progress: SweepProgress | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep into ``out``; returns the result written to ``out/sweep.json``. ``healed``: heal
    folders by name, measured as points beside the planned ones."""
    return Sweep(model, tokenizer, settings, out, model_name=model_name, dtype=dtype, device=device, command=command,
                 fresh=fresh, healed=healed).run(progress)


def _bench_settings(bench: BenchSettings) -> dict[str, Any]:
    """The timing settings a point depends on (a sweep always decodes after corpus text, so that is not named)."""
    settings = {**dataclasses.asdict(bench), "batch_sizes": list(bench.batch_sizes)}
    settings.pop("decode_prompts")
    return settings


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _read_plan(path: Path) -> Skipper:
    """A plan or policy file this sweep saved."""
    try:
        return load_skipper(path)
    except PlanError as exc:
        raise SweepError(f"{exc} It was saved by an earlier run of this sweep: delete it to re-plan, or pass --fresh."
                         ) from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

