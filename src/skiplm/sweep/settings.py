"""What a sweep measures and how (:class:`SweepSettings`), what identifies a point and its results (labels, keys,
settings hashes), and the points file ``OUT/points.jsonl`` that lets a sweep resume: one JSON line per finished
point, appended and flushed the moment it is done.

A point is a method at a target, or the full model, the baseline every sweep measures first. The full model is not
a method: the sweep keys it by method ``None``; files and tables label it :data:`FULL_MODEL`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, SweepError
from ..integrations.tasks import resolve_tasks
from ..measure.speed import BenchSettings
from ..report.shapes import NUMBER, shape_problem
from .compare import method_names

POINTS_FILE = "points.jsonl"
PLANS_FOLDER = "plans"
FULL_MODEL = "full"  # the full-model point's label in points.jsonl, sweep.json and the tables
FULL_TARGET = 1.0


# -- settings -----------------------------------------------------------------------------------------------------------
def _setting(default: Any, help: str, *, minimum: int | None = None, flag: str | None = None) -> Any:
    """A sweep setting with what its command-line option says (``skiplm bench --sweep`` makes its options from these:
    ``--name-with-dashes``, or ``flag``) and the least value it takes."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "flag": flag})


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What a sweep measures and how. ``bench`` holds the speed settings (batch sizes, lengths, repeats)."""

    methods: tuple[str, ...]
    targets: tuple[float, ...]
    corpus: str = _setting("pydoc", "held-out perplexity text: gsm8k, pydoc, or a text file")
    tokens: int = _setting(4096, "perplexity tokens scored", minimum=1)
    context: int = _setting(1024, "perplexity window length", minimum=2)
    stride: int = _setting(512, "perplexity window advance", minimum=1)
    prompts: str = _setting("gsm8k", "agreement prompts: gsm8k, or a file (one per line, or JSON Lines)")
    limit: int = _setting(16, "agreement on the first N prompts", minimum=1)
    agree_tokens: int = _setting(64, "greedy tokens generated per agreement prompt (--new-tokens is the timed decode "
                                     "steps)", minimum=1)
    agree_batch_size: int = 8
    chat: bool = _setting(True, "wrap agreement prompts in the model's chat template", flag="--chat/--raw")
    calibration_corpus: str = _setting("gsm8k", "text the data-driven planners are fitted on")
    sequences: int = _setting(2, "calibration sequences of the data-driven planners", minimum=1)
    length: int = _setting(512, "tokens per calibration sequence", minimum=1)
    bench: BenchSettings = BenchSettings()
    seed: int = _setting(0, "torch seed")
    tasks: tuple[str, ...] = _setting((), "task accuracy at each point, through lm-evaluation-harness, offline: "
                                          "comma-separated skiplm_gsm8k, skiplm_gpqa_diamond, or skiplm_offline for "
                                          "both (default: none)")
    task_limit: int = _setting(20, "with --tasks, score the first N examples of each task", minimum=1)
    task_max_tokens: int | None = _setting(None, "with --tasks, at most N generated tokens per GSM8K problem "
                                                 "(default: the task's own, 256)", minimum=1)
    task_batch_size: int = 8

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The settings a command line sets one by one (those with a help text), in declaration order."""
        return [field for field in dataclasses.fields(cls) if "help" in field.metadata]

    def check(self) -> None:
        """Refuse bad settings before anything expensive runs."""
        if not self.methods:
            raise SweepError("no methods to sweep: pass --methods, e.g. uniform,greedy-loss,search.")
        known = method_names()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise SweepError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(known)}.")
        if len(set(self.methods)) != len(self.methods):
            raise SweepError(f"a method is listed twice in {', '.join(self.methods)}.")
        if not self.targets:
            raise SweepError("no targets to sweep: pass --targets, e.g. 1.1,1.2,1.3.")
        bad = [t for t in self.targets if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 1.0)]
        if bad:
            raise SweepError(f"target speedups must be greater than 1, got {', '.join(map(str, bad))}.")
        if len({target_label(t) for t in self.targets}) != len(self.targets):
            raise SweepError(f"a target is listed twice in {', '.join(map(target_label, self.targets))}.")
        if not 0 < self.stride < self.context:
            raise SweepError(f"--stride must be in 1..{self.context - 1} (less than --context {self.context}), "
                             f"got {self.stride}.")
        least = {f"--{field.name.replace('_', '-')}": (getattr(self, field.name), field.metadata["minimum"])
                 for field in self.options() if field.metadata["minimum"] is not None}
        b = self.bench
        least.update({"--repeats": (b.repeats, 1), "--prompt-tokens": (b.prompt_tokens, 1),
                      "--new-tokens": (b.new_tokens, 1), "--decode-prompt-tokens": (b.decode_prompt_tokens, 1),
                      "--warmup": (b.warmup, 0)})
        for option, (value, minimum) in least.items():
            if value is not None and value < minimum:
                raise SweepError(f"{option} must be at least {minimum}, got {value}.")
        if not b.batch_sizes or min(b.batch_sizes) < 1:
            raise SweepError(f"batch sizes must be positive integers, got {b.batch_sizes}.")
        if self.tasks:
            self.task_names()  # refuses an unknown name, listing the offline tasks
            if importlib.util.find_spec("lm_eval") is None:
                raise SweepError("--tasks scores each point through lm-evaluation-harness, which is not installed: "
                                 "`pip install 'skiplm[lm-eval]'`.")

    def task_names(self) -> tuple[str, ...]:
        """The offline tasks scored at each point (the tag ``skiplm_offline`` expanded); an unknown name is refused."""
        try:
            return resolve_tasks(self.tasks)
        except DataError as exc:
            raise SweepError(str(exc)) from None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["methods"], data["targets"] = list(self.methods), list(self.targets)
        data["tasks"] = list(self.task_names())
        data["bench"]["batch_sizes"] = list(self.bench.batch_sizes)
        return data


def target_label(target: float) -> str:
    """A target as written in file names and tables: 1.1, 1.25."""
    return f"{float(target):g}"


def point_key(method: str | None, target: float) -> tuple[str, str]:
    """How finished points are keyed: (method or :data:`FULL_MODEL`, target label)."""
    return FULL_MODEL if method is None else method, target_label(target)


def is_full_model(record: dict[str, Any]) -> bool:
    """Whether a point record is the full model's (the first point of every sweep) rather than a method's."""
    return record["method"] == FULL_MODEL


# what every point record holds, and what a measured one (no error) holds besides
POINT_SHAPE = {"method": str, "target": NUMBER, "settings_hash": str}
MEASURED_POINT_SHAPE = {"perplexity.perplexity": NUMBER, "agreement": dict, "speed": dict, "speed.plan": dict,
                        "speed.plan{}": dict, "ideal_speedup": dict}
# and what its task accuracy holds, where it has any (`--tasks`): per task, the accuracy and what it was measured on
TASKS_SHAPE = {"tasks": dict, "tasks{}": dict, "tasks{}.accuracy": NUMBER, "tasks{}.stderr": (*NUMBER, type(None)),
               "tasks{}.examples": NUMBER, "tasks{}.settings_hash": str}


def point_problem(record: Any, where: str = "the record") -> str | None:
    """What a point record (a line of points.jsonl, an item of sweep.json's points) lacks, in words, or None. A
    record whose ``error`` is null says it was measured, so it must hold the measurements too."""
    if not isinstance(record, dict):
        return f"{where} is not an object"
    problem = shape_problem(record, POINT_SHAPE)
    if problem is None and "error" in record and record["error"] is None:  # says it was measured: it must hold them
        problem = shape_problem(record, MEASURED_POINT_SHAPE)
    if problem is None and "tasks" in record:
        problem = shape_problem(record, TASKS_SHAPE)
    if problem is not None and where:
        problem = f"{where}: {problem}"
    return problem


def plan_file_name(method: str, target: float) -> str:
    return f"{method}-{target_label(target)}.json"



def settings_hash(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def token_hash(values: Any) -> str:
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
        problem = point_problem(record, "")
        if problem is not None:
            raise SweepError(f"{path}, line {number} is not a sweep point ({problem}; a point needs method, target "
                             "and settings_hash, and a measured one its perplexity, agreement and speed): pass "
                             "--fresh to start the sweep over, or use another output folder.")
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

