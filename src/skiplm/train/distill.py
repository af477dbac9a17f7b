"""Distillation of a skipped *student* toward the full model as *teacher*, on the transformers ``Trainer``.

The teacher is the same weights, never a second copy: inside :meth:`Student.teacher` the plan is off, the adapter is
off (peft's ``disable_adapter``) and every weight a healing step changed is back to its original value, bit for bit.
What trains is either a peft LoRA adapter (``lora``) or whole kept layers (``partial``).

Loss: forward KL(teacher || student) of the next-token distributions, per token, over the positions the data's loss
mask marks. Under bf16 autocast (``bf16``: on by default where the CPU or GPU has bf16 units) both the teacher's and
the student's forward run in bf16; the loss, the optimizer and the trainable weights stay fp32, and the held-out
evaluation runs in the model's own dtype, without autocast.

Every ``eval_every`` steps, on held-out sequences: the KL, the acceptance proxy ``sum_v min(p, q)`` (the expected
acceptance of a drafted token, in speculative decoding's terms), the student's perplexity and top-1 agreement. The
best evaluation's weights are kept (``best.safetensors`` in the run folder); ``patience`` evaluations without a 0.5%
better KL stop the run early; ``minutes`` bounds its wall time. A run folder (``run.json``, ``checkpoint-N/``) makes a
run resumable: Ctrl-C stops after the current step with a checkpoint, and ``resume=True`` continues from the last
checkpoint (optimizer, schedule, data order and random state included: the same weights as an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SkipLMError
from ..files import write_bytes_atomic, write_text_atomic

RUN_FILE = "run.json"
BEST_FILE = "best.safetensors"
LOG_FILE = "log.json"  # losses and evaluations so far (a resumed run's record starts from them)
TRAINABLE_FILE = "trainable.safetensors"  # in each checkpoint-N/: the trained tensors only, never the whole model
_BETTER = 0.995  # an evaluation counts as better when its KL is below 99.5% of the best so far


class TrainError(SkipLMError):
    """Training cannot start or continue as asked."""


class TrainingInterrupted(TrainError):
    """Ctrl-C stopped the run after a checkpoint; ``resume=True`` continues it."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How long and how a distillation runs. ``steps``: optimizer steps at most; ``minutes``: wall-time bound (None:
    none); ``batch_size`` sequences per step; ``eval_every`` steps between held-out evaluations (and checkpoints);
    ``patience`` evaluations without improvement before stopping early (0: never); ``bf16``: autocast (None: where
    the hardware has bf16 support); ``seed``: data order and initialisation."""

    steps: int = 200
    minutes: float | None = None
    batch_size: int = 4
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    eval_every: int = 20
    patience: int = 3
    bf16: bool | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainError(f"{name} must be a whole number >= 1, got {value!r}.")
        for name in ("warmup_steps", "patience", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainError(f"{name} must be a whole number >= 0, got {value!r}.")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise TrainError(f"minutes must be > 0 (or None for no time bound), got {self.minutes!r}.")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs on bf16 units here (else it is emulated, and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# -- data ------------------------------------------------------------------------------------------------------------
class Sequences(torch.utils.data.Dataset):
    """Token-id sequences [N, L] with a loss mask [N, L] (True where the next-token prediction counts) and an
    attention mask (False on padding)."""

    def __init__(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, source: str = "token ids"):
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise TrainError(f"training data must be [sequences, tokens >= 2] token ids, got {tuple(input_ids.shape)}.")
        self.input_ids = input_ids.long().cpu()
        self.attention_mask = (torch.ones_like(self.input_ids, dtype=torch.bool) if attention_mask is None
                               else attention_mask.bool().cpu())
        self.loss_mask = self.attention_mask.clone() if loss_mask is None else loss_mask.bool().cpu() & self.attention_mask
        self.source = source

    @classmethod
    def of(cls, data: Any) -> Sequences:
        """From Sequences, a [N, L] tensor, a list of [1, L] / [B, L] batches (calibration), or anything with
        ``input_ids`` (and optional ``loss_mask`` / ``attention_mask``, e.g. :func:`skiplm.train.data.self_generated`)."""
        if isinstance(data, Sequences):
            return data
        if torch.is_tensor(data):
            return cls(data)
        if hasattr(data, "input_ids"):
            return cls(data.input_ids, getattr(data, "loss_mask", None), getattr(data, "attention_mask", None),
                       source=str(getattr(data, "source", "token ids")))
        batches = list(getattr(data, "batches", data))
        if not batches or not all(torch.is_tensor(b) and b.dim() == 2 for b in batches):
            raise TrainError("training data must be token ids: a [N, L] tensor, a list of [1, L] batches, or "
                             "skiplm.train.data.self_generated(...).")
        if len({b.shape[1] for b in batches}) != 1:
            raise TrainError("training batches must all have the same length.")
        return cls(torch.cat(batches), source=str(getattr(data, "source", "token ids")))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "loss_mask": self.loss_mask[index]}

    def tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    def digest(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes() + self.loss_mask.numpy().tobytes()).hexdigest()[:16]


# -- the student -----------------------------------------------------------------------------------------------------
class Student:
    """``model`` with ``base`` (a plan, or a heal to build on) applied and the part to train made trainable:
    ``adapter`` (a peft ``LoraConfig``) or ``layers`` (parameter names trained whole). Remove it with
    :meth:`remove` (the model is then exactly as before, whatever the training did)."""

    def __init__(self, model: nn.Module, base, *, adapter=None, layers: list[str] | None = None):
        from ..skipper import apply

        if (adapter is None) == (layers is None):
            raise TrainError("a student trains either an adapter or layers.")
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.handle = apply(model, base)
        self.peft_model = None
        self.layer_names = list(layers or [])
        try:
            for param in model.parameters():
                param.requires_grad_(False)
            if adapter is not None:
                from peft import get_peft_model

                from ..heal.artifact import peft_quietly

                with peft_quietly():
                    self.peft_model = get_peft_model(model, adapter)
                self.trainable_module: nn.Module = self.peft_model
            else:
                parameters = dict(model.named_parameters())
                with self.handle.disabled():  # the full model's values of the trained layers: the teacher's
                    self.originals = {name: parameters[name].detach().clone() for name in self.layer_names}
                for name in self.layer_names:
                    parameters[name].requires_grad_(True)
                self.trainable_module = model
            # a base whose handle trains parameters of its own (FiRST's routers, a submodule of the model while
            # installed) names them; they train beside the adapter or layers
            for param in getattr(self.handle, "trainable_parameters", lambda: [])():
                param.requires_grad_(True)
        except BaseException:
            self.remove()
            raise

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.trainable_module.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        """The full model inside this block: plan off, adapter off, every healed weight at its original value."""
        if self.peft_model is not None:
            with self.peft_model.disable_adapter(), self.handle.disabled():
                yield
            return
        parameters = dict(self.model.named_parameters())
        trained = {name: parameters[name].detach().clone() for name in self.layer_names}
        with torch.no_grad():
            for name in self.layer_names:
                parameters[name].copy_(self.originals[name])
        try:
            with self.handle.disabled():
                yield
        finally:  # after the handle re-bakes its own steps: the trained values win over an earlier step's
            with torch.no_grad():
                for name in self.layer_names:
                    parameters[name].copy_(trained[name])

    def step(self):
        """The trained part as a healing step (:mod:`skiplm.heal.artifact`)."""
        from peft import get_peft_model_state_dict

        from ..heal.artifact import AdapterStep, LayersStep

        if self.peft_model is not None:
            config = self.peft_model.peft_config["default"]
            return AdapterStep(config, get_peft_model_state_dict(self.peft_model))
        parameters = dict(self.model.named_parameters())
        layers = sorted({int(name.split(".")[_layer_field(name)]) for name in self.layer_names})
        return LayersStep({name: parameters[name].detach().clone() for name in self.layer_names}, layers)

    def remove(self) -> None:
        if self.peft_model is not None:
            self.peft_model.unload()
            self.peft_model = None
        elif getattr(self, "originals", None) is not None:
            parameters = dict(self.model.named_parameters())
            with torch.no_grad(), self.handle.disabled():  # back to the full model's values before the handle goes
                for name in self.layer_names:
                    parameters[name].copy_(self.originals[name])
        self.handle.remove()
        for param, flag in self.flags:
            param.requires_grad_(flag)


def _layer_field(name: str) -> int:
    """Index of the layer number in a parameter name like ``model.layers.7.mlp.up_proj.weight``."""
    parts = name.split(".")
    return next(i for i, part in enumerate(parts) if part.isdigit())


# -- losses and metrics ----------------------------------------------------------------------------------------------
def _masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(p_teacher || q_student), fp32. Logits [B, L, V], mask [B, L]."""
    mask = mask[:, 1:]  # position t's logits predict token t+1; the mask marks tokens whose prediction counts
    t = teacher_logits[:, :-1][mask].float().log_softmax(-1)
    s = student_logits[:, :-1][mask].float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _masked_nll(student_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of the next-token cross-entropy, fp32. Logits [B, L, V], ids and mask [B, L]."""
    mask = mask[:, 1:]
    return torch.nn.functional.cross_entropy(student_logits[:, :-1][mask].float(), ids[:, 1:][mask])


@torch.no_grad()
def held_out_metrics(model: nn.Module, student: Student, data: Sequences, batch_size: int) -> dict[str, float]:
    """KL to the teacher, acceptance proxy sum(min(p, q)), student perplexity and top-1 agreement on ``data``."""
    totals = dict(kl=0.0, acceptance=0.0, nll=0.0, teacher_nll=0.0, agreement=0.0)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            ids = data.input_ids[start:start + batch_size].to(_device(model))
            attention = data.attention_mask[start:start + batch_size].to(ids.device)
            mask = data.loss_mask[start:start + batch_size, 1:].to(ids.device)
            with student.teacher():
                teacher_logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            student_logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            p = teacher_logits[:, :-1][mask].float().log_softmax(-1)
            q = student_logits[:, :-1][mask].float().log_softmax(-1)
            target = ids[:, 1:][mask]
            totals["kl"] += float((p.exp() * (p - q)).sum(-1).sum())
            totals["acceptance"] += float(torch.minimum(p.exp(), q.exp()).sum(-1).sum())
            totals["nll"] += float(-q.gather(-1, target[:, None]).sum())
            totals["teacher_nll"] += float(-p.gather(-1, target[:, None]).sum())
            totals["agreement"] += float((p.argmax(-1) == q.argmax(-1)).sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    count = max(count, 1)
    return {"kl": totals["kl"] / count, "acceptance": totals["acceptance"] / count,
            "perplexity": math.exp(totals["nll"] / count), "teacher_perplexity": math.exp(totals["teacher_nll"] / count),
            "agreement": totals["agreement"] / count, "tokens": count}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- the run ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    """What :func:`distill` returns: the trained step and its record (steps, seconds, tokens, losses, evaluations)."""

    step: Any
    record: dict[str, Any]


def distill(model: nn.Module, base, data: Any, held_out: Any, *, adapter=None, layers: list[str] | None = None,
            settings: TrainSettings = TrainSettings(), run_dir: str | Path | None = None, resume: bool = False,
            progress: Callable[[int, int, dict[str, float]], None] | None = None,
            identity: dict[str, Any] | None = None, objective: str = "kl") -> TrainResult:
    """Train ``adapter`` (a peft ``LoraConfig``) or ``layers`` (parameter names) of ``model`` with ``base`` applied
    toward the full model, on ``data``; evaluate on ``held_out``. ``run_dir`` keeps checkpoints (a temporary folder
    if None: then nothing resumes); ``resume`` continues the run there. ``progress(step, total, info)`` after every
    step. ``identity``: what the run is (plan, method, options) — a resumed run must match it. ``model`` is unchanged
    afterwards. ``objective``: ``kl`` (to the teacher, the default) or ``lm`` (the student's next-token
    cross-entropy on the data itself, no teacher forward; evaluations and the best checkpoint still go by KL)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if objective not in ("kl", "lm"):
        raise TrainError(f"objective must be 'kl' (to the full model) or 'lm' (next-token loss), got {objective!r}.")

    train, evaluation = Sequences.of(data), Sequences.of(held_out)
    if len(evaluation) == 0 or evaluation.tokens() == 0:
        raise TrainError("held-out data is empty: distillation needs held-out sequences for its evaluations.")
    device = _device(model)
    bf16 = bf16_supported(device) if settings.bf16 is None else settings.bf16
    if bf16 and not bf16_supported(device):
        raise TrainError(f"bf16 autocast is not supported on this {device.type} (no bf16 units); train with bf16=False.")
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            if resume:
                raise TrainError("resume needs the run folder of the interrupted run (run_dir).")
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="skiplm-train-"))
        run_dir = Path(run_dir)
        # what a resumed run must match (the time bound may change: it only says when to stop)
        run_record = {"identity": identity or {}, "settings": {k: v for k, v in dataclasses.asdict(settings).items()
                                                               if k != "minutes"}, "data": train.digest(),
                      "held_out": evaluation.digest(), "bf16": bf16}
        checkpoint = _prepare_run_dir(run_dir, run_record, resume)
        from transformers import set_seed

        set_seed(settings.seed)  # peft initialises LoRA's A matrices from the global generator
        student = Student(model, base, adapter=adapter, layers=layers)
        stack.callback(student.remove)
        stop = _Stopper(settings.minutes)
        stack.enter_context(stop.catching_ctrl_c())
        log = _load_log(run_dir, _checkpoint_step(checkpoint))
        best = _Best(run_dir, student, settings.patience)

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop.reason is not None:
                    control.should_training_stop = True
                    control.should_save = stop.reason == "interrupted"
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    log["losses"].append([state.global_step, round(float(logs["loss"]), 5)])
                    seconds = max(time.perf_counter() - stop.start, 1e-9)
                    info = {"loss": float(logs["loss"]),
                            "tokens_per_second": (state.global_step - stop.first_step) * tokens_per_step / seconds}
                    if log["evaluations"]:
                        info.update({f"held_out_{k}": v for k, v in log["evaluations"][-1].items() if k != "step"})
                    if progress is not None:
                        progress(state.global_step, settings.steps, info)

        tokens_per_step = settings.batch_size * train.input_ids.shape[1]

        class _DistillTrainer(Trainer):
            def compute_loss(self, model_, inputs, return_outputs=False, num_items_in_batch=None):
                ids, attention, mask = inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"]
                # explicit autocast (the Trainer's own bf16 flag left autocast off on CPU here: fp32 speed)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    if objective == "kl":
                        with torch.no_grad(), student.teacher():
                            teacher_logits = model_(input_ids=ids, attention_mask=attention, use_cache=False).logits
                    student_logits = model_(input_ids=ids, attention_mask=attention, use_cache=False).logits
                loss = (_masked_kl(teacher_logits, student_logits, mask) if objective == "kl"
                        else _masked_nll(student_logits, ids, mask))
                extra = getattr(student.handle, "training_loss", None)  # a base's own term (FiRST's skip-rate cost)
                if extra is not None:
                    loss = loss + extra().to(loss.device)
                return (loss, student_logits) if return_outputs else loss

            def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
                if stop.first_step and self.state.global_step == stop.first_step:  # resumed: evaluated before
                    return {}
                metrics = held_out_metrics(model, student, evaluation, settings.batch_size)
                log["evaluations"].append({"step": self.state.global_step, **{k: round(v, 6) for k, v in metrics.items()}})
                write_text_atomic(run_dir / LOG_FILE, json.dumps(log) + "\n")
                if best.update(self.state.global_step, metrics["kl"]):
                    self.control.should_training_stop = True
                    stop.reason = stop.reason or "early stop"
                self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                                 {f"eval_{k}": v for k, v in metrics.items()})
                return metrics

            def _save(self, output_dir=None, state_dict=None):
                from safetensors.torch import save

                folder = Path(output_dir or self.args.output_dir)
                folder.mkdir(parents=True, exist_ok=True)
                tensors = {name: p.detach().cpu().contiguous() for name, p in student.trainable().items()}
                write_bytes_atomic(folder / TRAINABLE_FILE, save(tensors))
                write_text_atomic(run_dir / LOG_FILE, json.dumps(log) + "\n")

            def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
                _load_trainable(student, Path(resume_from_checkpoint) / TRAINABLE_FILE)

        args = TrainingArguments(
            output_dir=str(run_dir), per_device_train_batch_size=settings.batch_size, max_steps=settings.steps,
            learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=settings.warmup_steps,
            weight_decay=0.0, max_grad_norm=1.0, logging_strategy="steps", logging_steps=1, eval_strategy="steps",
            eval_steps=settings.eval_every, eval_on_start=True, save_strategy="steps", save_steps=settings.eval_every, save_total_limit=2,
            seed=settings.seed, data_seed=settings.seed, bf16=False, use_cpu=device.type == "cpu", report_to=[],
            disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, log_level="error",
            save_only_model=False)
        trainer = _DistillTrainer(model=student.trainable_module, args=args, train_dataset=train,
                                  eval_dataset=evaluation, callbacks=[_Callback()])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        stop.first_step = _checkpoint_step(checkpoint)
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if stop.reason == "interrupted":
            raise TrainingInterrupted(f"training stopped at step {trainer.state.global_step} of {settings.steps}; "
                                      f"the checkpoint is in {run_dir}. Run again with resume to continue.")
        final = held_out_metrics(model, student, evaluation, settings.batch_size)
        log["evaluations"].append({"step": trainer.state.global_step, **{k: round(v, 6) for k, v in final.items()}})
        best.update(trainer.state.global_step, final["kl"])
        best.restore()
        chosen = held_out_metrics(model, student, evaluation, settings.batch_size) if best.step != trainer.state.global_step else final
        record = {
            "steps": trainer.state.global_step, "max_steps": settings.steps, "best_step": best.step,
            "stopped": stop.reason or "max steps", "seconds": round(time.perf_counter() - stop.start, 1),
            "tokens": trainer.state.global_step * tokens_per_step,  # positions trained on (batch x length)
            "train_loss": round(float(output.training_loss), 5), "bf16": bf16,
            "settings": dataclasses.asdict(settings), "data": {"source": train.source, "sequences": len(train),
                                                               "tokens": train.tokens(), "digest": train.digest()},
            "held_out": {"source": evaluation.source, "sequences": len(evaluation), **{k: round(v, 6) for k, v in chosen.items()}},
            **log,
        }
        return TrainResult(student.step(), record)


def _load_log(run_dir: Path, step: int) -> dict[str, Any]:
    """The losses and evaluations an interrupted run logged up to ``step`` (its checkpoint), to continue from."""
    path = run_dir / LOG_FILE
    log = json.loads(path.read_text(encoding="utf-8")) if step and path.is_file() else {}
    return {"losses": [e for e in log.get("losses", []) if e[0] <= step],
            "evaluations": [e for e in log.get("evaluations", []) if e["step"] <= step]}


def _checkpoint_step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0


def _prepare_run_dir(run_dir: Path, record: dict[str, Any], resume: bool) -> Path | None:
    """Check or start the run folder; the last checkpoint to resume from (None: start fresh)."""
    path = run_dir / RUN_FILE
    if resume:
        if not path.is_file():
            raise TrainError(f"{run_dir} holds no run to resume (no {RUN_FILE}); start it without resume.")
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier != json.loads(json.dumps(record)):
            diff = sorted(k for k in record if earlier.get(k) != json.loads(json.dumps(record[k])))
            raise TrainError(f"{run_dir} holds a different run (its {', '.join(diff)} differ): resume with the same "
                             "plan, method, options, data and settings, or start a new run in another folder.")
        checkpoints = sorted(run_dir.glob("checkpoint-*"), key=_checkpoint_step)
        complete = [c for c in checkpoints if (c / TRAINABLE_FILE).is_file() and (c / "trainer_state.json").is_file()]
        return complete[-1] if complete else None
    if run_dir.exists() and any(run_dir.iterdir()):
        if path.is_file():
            raise TrainError(f"{run_dir} already holds a training run: resume it, or start in a new folder.")
        raise TrainError(f"{run_dir} is not empty and is not a training run folder: choose another.")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return None


def _load_trainable(student: Student, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainError(f"{path} is missing: the checkpoint is incomplete; remove that checkpoint folder and resume.")
    tensors = load_file(str(path))
    trainable = student.trainable()
    if set(tensors) != set(trainable):
        raise TrainError(f"{path} holds other weights than this run trains: it is from another run.")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[name])


class _Best:
    """The best evaluation so far (lowest held-out KL), its weights on disk, and the early-stop count."""

    def __init__(self, run_dir: Path, student: Student, patience: int):
        self.path, self.student, self.patience = run_dir / BEST_FILE, student, patience
        self.meta = run_dir / "best.json"
        saved = json.loads(self.meta.read_text()) if self.meta.is_file() else {}
        self.kl = saved.get("kl", math.inf)
        self.step = saved.get("step")
        self.stale = saved.get("stale", 0)

    def update(self, step: int, kl: float) -> bool:
        """Record an evaluation; True when the run should stop early."""
        from safetensors.torch import save

        if kl < self.kl * _BETTER or self.step is None:
            self.kl, self.step, self.stale = kl, step, 0
            tensors = {name: p.detach().cpu().contiguous() for name, p in self.student.trainable().items()}
            write_bytes_atomic(self.path, save(tensors))
        elif step != self.step:
            self.stale += 1
        write_text_atomic(self.meta, json.dumps({"kl": self.kl, "step": self.step, "stale": self.stale}) + "\n")
        return self.patience > 0 and self.stale >= self.patience

    def restore(self) -> None:
        if self.path.is_file():
            _load_trainable(self.student, self.path)


class _Stopper:
    """Why the run stops early: Ctrl-C (``interrupted``), the time bound (``time bound``) or early stopping."""

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.start = time.perf_counter()
        self.first_step = 0
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        if self._reason is None and self.minutes is not None and time.perf_counter() - self.start > self.minutes * 60:
            self._reason = "time bound"
        return self._reason

    @reason.setter
    def reason(self, value: str | None) -> None:
        self._reason = value

    @contextlib.contextmanager
    def catching_ctrl_c(self) -> Iterator[None]:
        """First Ctrl-C: stop after this step with a checkpoint. A second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._reason == "interrupted":
                raise KeyboardInterrupt
            self._reason = "interrupted"

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


__all__ = [
    "Sequences",
    "Student",
    "TrainError",
    "TrainResult",
    "TrainSettings",
    "TrainingInterrupted",
    "bf16_supported",
    "distill",
    "held_out_metrics",
]
