"""The main job (``skiplm demo``, ``bash scripts/demo.sh``): skiplm at its best on the default model, measured in one
run, in about five minutes on 2 CPU cores.

1. **Lossless speculative decoding** against plain greedy decoding: the int8-dynamic draft (the fastest on this CPU,
   ``benchmarks/speculative``) with n-gram prompt lookup drafts, the full model verifies every token; GSM8K chat
   prompts, one untimed warm-up generation each way (reported), then plain and speculative alternating. Every
   speculative output must equal plain greedy's token for token, or the demo fails (:class:`SpeculativeMismatch`).
2. **The best static plan and its healed version**: the ``search`` plan shipped beside this module (the lowest
   held-out perplexity at every target of ``skiplm compare``; made on text the model generated itself, see
   :data:`PLAN_COMMAND`), healed here by LoRA distilled toward the full model on text the model generates itself
   (:func:`skiplm.heal.heal`, :func:`skiplm.train.data.self_generated`); a uniform 1.25x plan (Unified Layer
   Skipping) as the comparison row.
3. Held-out perplexity of the full model and every plan (pydoc and GSM8K text, which neither the plan's calibration
   nor the healing saw: :func:`~skiplm.measure.workflows.evaluate_and_report`) and decode speed, each row paired
   with the full model in the same run (:func:`~skiplm.measure.workflows.bench_and_report`; the healed row also
   merged).
4. One result: ``demo.json`` + ``summary.md`` (:func:`~skiplm.measure.workflows.write_demo_summary`), the tables
   each stage writes (``speculative.*``, ``eval.*``, ``bench.*``), the plans and the heal folder, and one HTML page
   (``report.html``, :func:`skiplm.report.html.write_report`), with what to try next.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PlanError
from ..files import check_output
from ..plan import SkipPlan

Progress = Callable[[str, int, int], None]  # (what runs now, steps done, steps in this stage)
Say = Callable[[str], None]

# the searched plans shipped for the default model (made for its weights: SkipPlan.check_model refuses others)
SHIPPED_TARGETS = (1.1, 1.2, 1.3)
DEFAULT_TARGET = 1.2
# how the shipped plans were made (benchmarks/heal/run.sh, steps 1-2: calibration on 2 x 256 tokens of text the full
# model generated itself, so pydoc and GSM8K stay held out); each `plans/search-T.json` was copied here as
# `search-Tx.json`
PLAN_COMMAND = ("skiplm self-generate --sequences 128 --length 256 -o self.txt && skiplm bench --sweep --methods "
                "search,block-influence --targets 1.1,1.2,1.3,1.5 --calibration-corpus self.txt --sequences 2 "
                "--length 256 --corpus pydoc --tokens 2048 --prompts gsm8k --limit 8 --agree-tokens 48 "
                "--batch-sizes 1 --prompt-tokens 128 --decode-prompt-tokens 64 --new-tokens 32 --repeats 3 "
                "--warmup 1 -o benchmarks/heal/sweep")


class SpeculativeMismatch(RuntimeError):
    """Speculative output differed from plain greedy decoding: a bug in skiplm (the command line says so), never a
    result to report."""


def shipped_plan_path(target: float = DEFAULT_TARGET) -> Path:
    """The shipped ``search`` plan for ``target`` (one of :data:`SHIPPED_TARGETS`) for the default model."""
    if target not in SHIPPED_TARGETS:
        raise PlanError(f"no shipped plan for {target}x; shipped: {', '.join(f'{t}x' for t in SHIPPED_TARGETS)} "
                        "(or make one: skiplm plan --method search --speedup T -o plan.json).")
    return Path(str(resources.files(__name__).joinpath(f"search-{target}x.json")))


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the defaults fit ~5 minutes on 2 CPU cores with the default model."""

    # speculative decoding
    prompts: int = 4  # GSM8K chat prompts, batch 1
    new_tokens: int = 128
    draft_dtype: str = "int8-dynamic"  # int8 where int8-dynamic cannot run (not a CPU)
    prompt_lookup: int = 3
    warmup: int = 1  # untimed generations each way first
    # static plans
    uniform_speedup: float = 1.25
    # healing: LoRA on self-generated text
    heal_steps: int = 14
    heal_minutes: float = 2.0  # wall-time bound on the training (a slow machine stops early; the record says so)
    heal_learning_rate: float = 4e-4  # (a short run: twice `lora`'s default)
    sequences: int = 16  # self-generated sequences (one batch); the last `held_out` are kept out of training
    length: int = 256
    held_out: int = 4
    # held-out perplexity and speed
    corpora: tuple[str, ...] = ("pydoc", "gsm8k")
    tokens: int = 1536  # per corpus: two 1024-token windows, stride 512
    context: int = 1024
    stride: int = 512
    repeats: int = 3  # timed rounds of the speed measure, after one warm-up round
    decode_tokens: int = 24  # greedy decode steps timed per round (after a 64-token chat prompt)


def run_demo(model: nn.Module, tokenizer, out: str | Path, plan: SkipPlan, *, plan_name: str,
             settings: DemoSettings = DemoSettings(), model_name: str, device: str = "cpu",
             command: str | None = None, cache_dir: str | Path | None = None, progress: Progress | None = None,
             say: Say | None = None) -> dict[str, Any]:
    """The whole demo on ``model`` with ``plan`` (checked against the model) as its static plan, writing into
    ``out``; returns the demo result (what ``demo.json`` holds). ``say(text)``: a line at each stage;
    ``progress(description, done, total)``: as the work goes. ``cache_dir``: where self-generated text is cached."""
    from ..heal import heal
    from ..measure.speed import BenchSettings
    from ..measure.workflows import bench_and_report, evaluate_and_report, write_demo_summary
    from ..planners import plan_uniform
    from ..report.files import machine_info
    from ..report.html import write_report
    from ..train.data import GenerationSettings, self_generated

    started = time.perf_counter()
    say = say or (lambda text: None)
    out = check_output(out, kind="folder", what="demo output folder")
    plan.check_model(model)  # a plan made for other weights is refused, saying so
    seconds: dict[str, float] = {}

    uniform_name = f"uniform-{settings.uniform_speedup:g}x"  # (planned first: a target out of reach fails now)
    uniform = plan_uniform(model, speedup=settings.uniform_speedup, name=model_name)

    # 1. lossless speculative decoding against plain greedy, in the same run
    say(f"[1/5] speculative decoding: {settings.prompts} GSM8K answers of up to {settings.new_tokens} tokens, plain "
        f"greedy vs the {settings.draft_dtype} draft + {settings.prompt_lookup}-gram prompt lookup (lossless)")
    stage = time.perf_counter()
    spec = _speculative(model, tokenizer, out, settings, model_name, device, command)
    seconds["speculative"] = time.perf_counter() - stage
    say(f"      {spec['speedup']:.2f}x the speed of plain greedy ({spec['tokens_per_s']:.1f} vs "
        f"{spec['plain_tokens_per_s']:.1f} tok/s); output identical in {spec['identical_rows']}/{spec['rows']}")

    # 2. the static plans
    plan.save(out / "plans" / f"{plan_name}.json")
    uniform.save(out / "plans" / f"{uniform_name}.json")

    # 3. healing the plan: LoRA distilled toward the full model on text it generates itself
    say(f"[2/5] text the full model writes itself: {settings.sequences} x {settings.length} tokens (cached)")
    stage = time.perf_counter()
    data = self_generated(model, tokenizer, GenerationSettings(sequences=settings.sequences, length=settings.length),
                          cache_dir=cache_dir,
                          progress=_stage(progress, "self-generating"))
    seconds["self_generated_text"] = time.perf_counter() - stage
    say(f"[3/5] healing {plan_name} with LoRA: {settings.heal_steps} steps (at most {settings.heal_minutes:g} min)")
    stage = time.perf_counter()
    report_training = _stage(progress, "healing (lora)")
    healed = heal(model, plan, "lora", calibration=data,
                  progress=lambda step, steps, info: report_training(step, steps),
                  steps=settings.heal_steps, minutes=settings.heal_minutes, learning_rate=settings.heal_learning_rate,
                  eval_every=settings.heal_steps, patience=0, held_out=settings.held_out)
    seconds["healing"] = time.perf_counter() - stage
    healed_name = f"{plan_name} (healed)"
    healed.save(out / "healed")
    training = healed.provenance["lora"]["training"]
    say(f"      {training['steps']} steps in {training['seconds']:.0f} s ({training['stopped']}); held-out KL to the "
        f"full model {training['evaluations'][0]['kl']:.3f} -> {training['held_out']['kl']:.3f}")

    # 4. held-out perplexity and speed, every row against the full model in the same run
    plans = {plan_name: plan, healed_name: healed, uniform_name: uniform}
    say(f"[4/5] held-out perplexity: {settings.tokens} tokens each of {', '.join(settings.corpora)}")
    stage = time.perf_counter()
    quality = evaluate_and_report(model, tokenizer, {"full": None, **plans}, settings.corpora, settings.tokens,
                                  settings.context, settings.stride, out, model_name, device, command=command,
                                  progress=progress)
    seconds["perplexity"] = time.perf_counter() - stage
    say(f"[5/5] speed: decode at batch 1, {settings.repeats} rounds after a warm-up, every row paired with the full "
        "model (the healed one unmerged and merged)")
    stage = time.perf_counter()
    bench = BenchSettings(batch_sizes=(1,), prompt_tokens=128, decode_prompt_tokens=64,
                          new_tokens=settings.decode_tokens, repeats=settings.repeats, warmup=1,
                          decode_prompts="gsm8k-chat")
    speed = bench_and_report(model, tokenizer, plans, bench, False, out, model_name, device, command=command,
                             progress=progress)
    seconds["speed"] = time.perf_counter() - stage

    rows = _rows(quality, speed, spec, plan, plan_name, healed_name, uniform, uniform_name, training)
    result = {
        "kind": "demo",
        "command": command, "model": model_name, "machine": machine_info(device),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()},
        "corpora": list(quality["perplexity"]),
        "rows": rows,
        "speculative": spec,
        "healing": {"method": "lora", "plan": plan_name, "folder": str(out / "healed"), "steps": training["steps"],
                    "seconds": training["seconds"], "stopped": training["stopped"], "tokens": training["tokens"],
                    "data": {"sequences": len(data), "length": settings.length, "generated_now": data.generated,
                             "seconds": round(data.seconds, 1), "cache": str(data.path)},
                    "held_out_kl": [training["evaluations"][0]["kl"], training["held_out"]["kl"]]},
        "plan_source": {"name": plan_name, "command": PLAN_COMMAND},
        "notes": _notes(spec, settings, plan_name, uniform_name, training, data),
        "next": next_steps(out, plan_name, settings),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)  # (the report itself takes ~1 s)
    write_demo_summary(out, result)
    write_report([out], out / "report.html", title=f"skiplm demo, {model_name}")
    return result


def _stage(progress: Progress | None, description: str) -> Callable[[int, int], None]:
    return (lambda done, total: progress(description, done, total)) if progress else (lambda done, total: None)


def _speculative(model, tokenizer, out: Path, settings: DemoSettings, model_name: str, device: str,
                 command: str | None) -> dict[str, Any]:
    """Plain greedy and the draft on the same prompts in one run
    (:func:`skiplm.speculative.bench.run_speculative_bench`), written as ``speculative.json`` / ``.md`` / ``.png``;
    refuses (loudly) any output that differs."""
    from ..report.files import machine_info
    from ..speculative.bench import Draft, prompt_set, run_speculative_bench, write_bench
    from ..speculative.decoder import DEFAULT_MAX_DRAFT
    from ..speculative.search import searchable_precisions

    usable, _ = searchable_precisions([settings.draft_dtype], next(model.parameters()).device)
    precision = usable[0] if usable else "int8"
    name = f"{precision}+lookup"
    draft = Draft(name, dtype=precision, lookup=settings.prompt_lookup)
    result = run_speculative_bench(model, {"gsm8k": prompt_set(tokenizer, "gsm8k", settings.prompts)}, [draft],
                                   batch_sizes=(1,), new_tokens=settings.new_tokens, repeats=1,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                                   warmup=settings.warmup)
    bench_settings = {"model": model_name, "command": command, "machine": machine_info(device),
                      "limit": settings.prompts, "new_tokens": settings.new_tokens,
                      "max_draft": DEFAULT_MAX_DRAFT, "repeats": 1, "batch_sizes": [1]}
    write_bench(out, result, bench_settings, f"self-speculative decoding, {model_name}")
    entry = result["results"]["gsm8k_b1"]
    measured = entry[name]
    if measured["identical_rows"] != entry["rows"]:
        raise SpeculativeMismatch(
            f"speculative decoding gave other text than plain greedy decoding in "
            f"{entry['rows'] - measured['identical_rows']} of {entry['rows']} generations ({out / 'speculative.json'}): this is a bug in skiplm, please report it.")
    return {
        "draft": name, "description": result["drafts"][name], "prompts": "gsm8k", "rows": entry["rows"],
        "identical_rows": measured["identical_rows"], "new_tokens": settings.new_tokens,
        "plain_tokens_per_s": entry["plain"]["tokens_per_second"], "tokens_per_s": measured["tokens_per_second"],
        "speedup": measured["speedup"], "plain_seconds": entry["plain"]["seconds"][0],
        "seconds": measured["seconds"][0], "tokens": measured["tokens"],
        "acceptance_rate": measured["acceptance_rate"], "lookup_committed": measured["lookup_committed"],
        "fallbacks": measured["fallbacks"], "setup_seconds": result["setup_seconds"][name],
        "warmup_seconds": result["warmup"]["seconds"], "warmup_generations": result["warmup"]["generations"],
    }


def _rows(quality, speed, spec, plan, plan_name, healed_name, uniform, uniform_name, training) -> list[dict[str, Any]]:
    """The headline rows: the full model, speculative decoding, the plan, its healed version, the uniform plan."""
    scores = quality["perplexity"]
    full_ppl = {c: scores[c]["full"]["perplexity"] for c in scores}

    def ppl(name: str) -> dict[str, Any]:
        values = {c: scores[c][name]["perplexity"] for c in scores}
        return {"perplexity": values, "perplexity_x_full": {c: values[c] / full_ppl[c] for c in scores}}

    def decode(name: str) -> dict[str, Any]:
        r = speed["speed"][name]["decode_b1"]
        return {"kind": "decode", "speedup": r["speedup"], "ci95": list(r["speedup_ci95"]),
                "tokens_per_s": r["tokens_per_s"], "ideal_speedup": r["ideal_speedup"]}

    full_decode = speed["speed"]["full"]["decode_b1"]["tokens_per_s"]
    return [
        {"name": "full", "what": "the model as shipped (fp32), plain greedy decoding", **ppl("full"),
         "speed": {"kind": "reference", "generation_tokens_per_s": spec["plain_tokens_per_s"],
                   "decode_tokens_per_s": full_decode}},
        {"name": "speculative", "what": f"{spec['description']}; the full model verifies every token",
         "lossless": True, **ppl("full"),
         "speed": {"kind": "generation", "speedup": spec["speedup"], "tokens_per_s": spec["tokens_per_s"],
                   "plain_tokens_per_s": spec["plain_tokens_per_s"]}},
        {"name": plan_name, "what": f"static plan, method search: {plan.describe()}", **ppl(plan_name),
         "speed": decode(plan_name)},
        {"name": healed_name, "what": f"the same plan + LoRA trained {training['steps']} steps "
                                      f"({training['seconds']:.0f} s) toward the full model, merged",
         **ppl(healed_name), "speed": decode(f"{healed_name}, merged")},
        {"name": uniform_name, "what": f"static plan, method uniform (comparison): {uniform.describe()}",
         **ppl(uniform_name), "speed": decode(uniform_name)},
    ]


def _notes(spec, settings: DemoSettings, plan_name: str, uniform_name: str, training, data) -> list[str]:
    warm = spec["warmup_seconds"]
    made = "generated now" if data.generated else "from the cache"
    return [
        f"speculative: {spec['rows']} GSM8K chat prompts at batch 1, up to {settings.new_tokens} new tokens each, "
        f"plain greedy and speculative alternating, whole generations timed (prefill included); excluded: the draft's "
        f"set-up ({spec['setup_seconds']:.1f} s: the {spec['draft'].split('+')[0]} copy, the verifier's packed head) "
        f"and {spec['warmup_generations']} untimed warm-up generation(s) each way (plain {warm['plain']:.1f} s, "
        f"speculative {warm[spec['draft']]:.1f} s). Acceptance {spec['acceptance_rate']:.0%} of drafted tokens; "
        f"{spec['lookup_committed']} tokens came from prompt lookup.",
        f"held-out perplexity: {settings.tokens} tokens each of {', '.join(settings.corpora)} (context "
        f"{settings.context}, stride {settings.stride}); neither the plan's calibration nor the healing read them "
        "(both used text the model generated itself).",
        f"{plan_name}: made by `skiplm bench --sweep --methods search` on self-generated text (shipped with skiplm; "
        f"{', '.join(f'{t}x' for t in SHIPPED_TARGETS)} are shipped: `skiplm demo --target T`); {uniform_name}: "
        "planned in this run, evenly spaced blocks (Unified Layer Skipping), kept as the comparison that shows what "
        "a plan that ignores the model costs.",
        f"healing: LoRA rank 16 on every linear layer the plan runs, {training['steps']} steps of 4 x "
        f"{settings.length} tokens at learning rate {settings.heal_learning_rate:g} ({training['stopped']}), on {len(data) - settings.held_out} "
        f"self-generated sequences ({made}); {settings.held_out} held out for its KL. benchmarks/heal: longer "
        "training keeps lowering perplexity. Its speed row is the adapter merged into the weights (the plan's "
        "architecture); unmerged in bench.md.",
        f"speed: {settings.decode_tokens} greedy decode steps after a 64-token GSM8K chat prompt at batch 1, every "
        f"row paired with the full model round by round, {settings.repeats} rounds after a warm-up (median ratio, "
        "95% bootstrap interval); this machine's speed drifts, and ratios measured in one run hold better than "
        "absolute rates.",
    ]


def next_steps(out: Path, plan_name: str, settings: DemoSettings) -> list[list[str]]:
    """What to try next: real commands, with the demo's own files."""
    plan_file = Path(out) / "plans" / f"{plan_name}.json"
    return [
        ["skiplm generate --speculative --draft-dtype int8-dynamic --prompt \"What is 7 times 8?\"",
         "lossless speculative decoding of your own prompt (the full model's text, faster)"],
        ["skiplm bench-speculative --draft-dtype int8-dynamic --prompt-lookup 3 --batch-sizes 1,4 -o results/spec",
         "speculative vs plain greedy on more prompts (GSM8K and pydoc) and batch sizes"],
        [f"skiplm generate --heal {Path(out) / 'healed'} --merge --prompt \"What is 7 times 8?\"",
         "the healed plan, generating"],
        [f"skiplm heal --plan {plan_file} --method lora --option steps=200 -o healed-200/ --eval-corpus pydoc",
         "heal longer: the held-out KL was still falling when the demo stopped"],
        [f"skiplm agree --plan {plan_file} --heal {Path(out) / 'healed'} --limit 8",
         "does the plan still say what the full model says? (greedy, token by token)"],
        ["skiplm compare -o results/compare", "every planner at every target: held-out perplexity vs measured speed"],
        [f"skiplm report {out} -o {Path(out) / 'report.html'}", "this report again (add other result folders to it)"],
    ]


__all__ = ["DEFAULT_TARGET", "DemoSettings", "PLAN_COMMAND", "SHIPPED_TARGETS", "SpeculativeMismatch", "next_steps",
           "run_demo", "shipped_plan_path"]
