"""Result files and the tables in them: JSON with the machine and versions (:func:`machine_info`, :func:`write_json`),
markdown tables (:func:`markdown_table`), and for each kind of result the rows its tables show and the markdown file
that holds them — perplexity (``eval.md``), speed (``bench.md``), generation agreement (``agreement.json`` /
``agreement.md``), the depth analysis (``analysis.md``), CoLa (``cola.md``) and the demo's headline and
``summary.md``.

Everything here reads results (plain JSON-ready dicts, or objects with the same fields) and writes text: nothing
measures, and nothing imports the stages that measure. Plots are in :mod:`skiplm.report.plots`.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from .._version import __version__
from ..files import write_text_atomic
from ..system import keep_freed_memory

FULL = "full"  # the name every result gives the full model


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where a result was measured: platform, CPU (or GPU), threads and versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "skiplm": __version__,
        "device": device,
        "malloc_keeps_freed_memory": keep_freed_memory(),  # idempotent: whether the setting is (now) in force
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, whole or not at all (:func:`skiplm.files.write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> Path:
    """Write ``text``, whole or not at all (:func:`skiplm.files.write_text_atomic`)."""
    return write_text_atomic(path, text)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- perplexity ---------------------------------------------------------------------------------------------------
def perplexity_rows(result: Mapping[str, Any], *, ratios: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per configuration, one column per corpus: its perplexity (``ratios``: to 2 decimals, with the ratio to
    the full model's, as the terminal shows it; else to 3 decimals, as ``eval.md`` does)."""
    corpora = list(result["perplexity"])
    scores = result["perplexity"]
    if not ratios:
        tokens = result["settings"]["tokens"]
        return (["config"] + [f"ppl {c} ({tokens} tok)" for c in corpora],
                [[name] + [f"{scores[c][name]['perplexity']:.3f}" for c in corpora] for name in result["plans"]])
    rows = []
    for name in result["plans"]:
        cells = []
        for corpus in corpora:
            value = scores[corpus][name]["perplexity"]
            ratio = value / scores[corpus][FULL]["perplexity"] if FULL in result["plans"] and name != FULL else None
            cells.append(f"{value:.2f}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        rows.append([name, *cells])
    return ["config", *corpora], rows


def perplexity_markdown(result: Mapping[str, Any], model_name: str) -> str:
    """``eval.md``: the perplexity table and how it was measured."""
    s = result["settings"]
    headers, rows = perplexity_rows(result)
    return (f"# Perplexity, {model_name}\n\ncontext {s['context']}, stride {s['stride']}; plans' decode skip set applied "
            f"to every token.\n\n" + markdown_table(headers, rows))


# -- speed ------------------------------------------------------------------------------------------------------------
def measure_label(measure: str, settings: dict) -> str:
    """e.g. "prefill b8" — the token counts are stated once, by :func:`settings_line`."""
    kind, batch = measure.split("_b")
    return f"{kind} b{batch}"


def settings_line(settings: dict) -> str:
    chat = settings.get("decode_prompts") == "gsm8k-chat"
    kind = " (the end of a GSM8K question in the chat template)" if chat else ""
    return (f"prefill: {settings['prompt_tokens']} prompt tokens per row; decode: {settings['new_tokens']} greedy steps "
            f"after a {settings['decode_prompt_tokens']}-token prompt{kind}; b = batch size")


def speed_rows(speed: dict, settings: dict) -> tuple[list[str], list[list[str]]]:
    """One row per configuration and measure: time, throughput, measured and ideal speedup."""
    headers = ["config", "measure", "median", "tokens/s", "speedup vs full (paired)", "95% CI", "ideal speedup"]
    rows = []
    for name, measures in speed.items():
        for measure, r in measures.items():
            rows.append([
                name,
                measure_label(measure, settings),
                f"{r['median_s'] * 1000:.1f} ms",
                f"{r['tokens_per_s']:.1f}",
                f"{r['speedup']:.3f}x",
                "{:.2f}-{:.2f}".format(*r["speedup_ci95"]),
                f"{r['ideal_speedup']:.3f}x",
            ])
    return headers, rows


def policy_rows(speed: dict, settings: dict) -> tuple[list[str], list[list[str]]]:
    """Per input-adaptive policy and measure: what it skipped, what that saved, what deciding cost."""
    headers = ["policy", "measure", "MLPs skipped / token", "MLP time (probe)", "saved / token",
               "saved / skipped MLP time", "decision overhead / token"]
    rows = []
    for name, measures in speed.items():
        for measure, r in measures.items():
            policy = r.get("policy")
            if policy is None or name.endswith("(decisions only)"):
                continue
            share = policy.get("saved_share_of_skipped")
            rows.append([
                name, measure_label(measure, settings), f"{policy['skipped_mlps_per_token']:.2f}",
                _us(policy.get("mlp_s")), _us(policy.get("saved_s_per_token")),
                "-" if share is None else f"{share:.2f}", _us(policy.get("decision_overhead_s_per_token")),
            ])
    return headers, rows


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.0f} us"


def speed_markdown(result: Mapping[str, Any], model_name: str) -> str:
    """``bench.md``: where and how it was timed, the speed table, the policies' accounting, and the plot."""
    machine, settings = result["machine"], result["settings"]
    headers, rows = speed_rows(result["speed"], settings)
    policy_headers, policy_table = policy_rows(result["speed"], settings)
    policy_text = ""
    if policy_table:
        policy_text = ("\n## Input-adaptive policies\n\nMLP time: (full - static probe) / skippable layers, per token. "
                       "Saved: (full - policy) per token. Decision overhead: (decisions only - full) per token.\n\n"
                       + markdown_table(policy_headers, policy_table))
    return (f"# Speed, {model_name}\n\n{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}; "
            f"medians of {settings['repeats']} interleaved rounds after {settings['warmup']} warm-up. "
            f"{settings_line(settings)}.\n\n" + markdown_table(headers, rows) + policy_text
            + "\n![speedups](bench.png)\n")


# -- generation agreement ---------------------------------------------------------------------------------------------
def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def agreement_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per configuration: agreement with the full model, and accuracy where there are reference answers."""
    has_answers = any("accuracy" in s for s in result["summary"].values())
    headers = ["config", "prefix agreement", "prefix (pooled)", "positional match", "exact match",
               "mean matched prefix", "mean length", "stopped at EOS"]
    headers.append("answer agreement")
    if has_answers:
        headers.append("accuracy")
    rows = []
    for name, s in result["summary"].items():
        full = name == FULL
        row = [name] + (["(reference)"] * 5 if full else [
            _percent(s["prefix_agreement"]), _percent(s["prefix_agreement_pooled"]), _percent(s["positional_match"]),
            _percent(s["exact_match"]), f"{s['mean_matched_prefix']:.1f}"])
        row += [f"{s['mean_length'] if full else s['mean_candidate_length']:.1f}", _percent(s["stopped_at_eos"])]
        row += ["(reference)" if full else _percent(s["answer_agreement"])]
        if has_answers:
            row.append(_percent(s.get("accuracy")))
        rows.append(row)
    return headers, rows


def write_agreement(result: Mapping[str, Any], out: Path, model_name: str) -> dict[str, Path]:
    """``agreement.json`` (everything, incl. every output's tokens and text) and ``agreement.md`` (tables)."""
    out = Path(out)
    json_path = write_json(out / "agreement.json", dict(result))
    s = result["settings"]
    headers, rows = agreement_rows(result)
    plan_names = [name for name in result["summary"] if name != FULL]
    has_answers = any("reference_answer" in r for r in result["per_prompt"])
    prompt_headers = ["#", "prompt tokens", "full length"]
    for name in plan_names:
        prompt_headers += [f"{name}: first divergence", f"{name}: prefix agreement", f"{name}: exact"]
    prompt_headers += (["reference"] if has_answers else []) + ["full answer"] + [f"{name} answer" for name in plan_names]
    prompt_rows = []
    for record in result["per_prompt"]:
        row = [record["index"], record["prompt_tokens"], len(record[FULL]["tokens"])]
        for name in plan_names:
            o = record[name]
            row += ["—" if o["first_divergence"] is None else o["first_divergence"], _percent(o["prefix_agreement"]),
                    "yes" if o["exact_match"] else "no"]
        if has_answers:
            row.append(record.get("reference_answer", "—"))
        row += [_answer_cell(record[name]) for name in [FULL, *plan_names]]
        prompt_rows.append(row)
    plans = "".join(f"- `{name}`: {p['description']}\n" for name, p in result["plans"].items() if p) or "- none\n"
    text = (
        f"# Generation agreement, {model_name}\n\n"
        f"{s['count']} prompts from {s['prompts']}{' (chat template)' if s['chat_template'] else ''}; up to "
        f"{s['new_tokens']} new tokens, {s['decoding']}; batch size {s['batch_size']}. Agreement is measured against "
        "the full model's output on the same batches. Prefix agreement: share of the full model's tokens reproduced "
        "before the first divergence (mean over prompts; pooled: over all tokens). Positional match: share of positions "
        "with the same token. Answers: the last number in each output; answer agreement: the plan's is the same "
        "number as the full model's, over the prompts where the full model's output has one; accuracy: the same number as the reference's final answer.\n\n"
        f"Plans:\n{plans}\n" + markdown_table(headers, rows) + "\n## Per prompt\n\n"
        + markdown_table(prompt_headers, prompt_rows)
        + "\nEvery output's text and tokens are in agreement.json.\n"
    )
    return {"json": json_path, "markdown": write_text(out / "agreement.md", text)}


def _answer_cell(output: Mapping[str, Any]) -> str:
    answer = output["answer"] if output["answer"] is not None else "none"
    if "correct" in output:
        return f"{answer} {'✓' if output['correct'] else '✗'}"
    return answer


# -- the depth analysis -----------------------------------------------------------------------------------------------
def format_value(value: float, short: bool = False) -> str:
    """About 3 significant digits; ``short``: at most 5 characters where possible (the terminal table)."""
    if value != value:  # NaN
        return "-"
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if short:
        if magnitude < 0.01:
            mantissa, exponent = f"{value:.0e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        for digits in (3, 2, 1):
            text = f"{value:.{digits}f}"
            if len(text) <= 5:
                return text
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.1e}"


def analysis_settings_line(settings: Mapping[str, Any]) -> str:
    """What a depth analysis ran on, in one line (the markdown and the plots' titles)."""
    s = settings
    return (f"{s['sequences']} sequences x {s['length']} tokens = {s['tokens']} tokens of {s['corpus'] or 'text'}, "
            f"{s['dtype']}, {s['seconds']:.0f} s")


def analysis_markdown(result) -> str:
    """``analysis.md`` of an :class:`~skiplm.analysis.importance.AnalysisResult`: every column, one row per layer, and
    the plots :func:`skiplm.report.plots.analysis.plot_analysis` writes next to it."""
    columns = result.columns()
    headers = ["layer"] + [f"{c.label} {'↑' if c.important == 'high' else '↓'}" for c in columns]
    rows = [[str(layer)] + [format_value(c.values[layer]) for c in columns] for layer in range(result.num_layers)]
    return (
        f"# Depth analysis, {result.model_name}\n\n{analysis_settings_line(result.settings)}. Full model: loss "
        f"{result.full_loss:.4f} (perplexity {math.exp(result.full_loss):.2f}).\n\nDefinitions: see `definitions` in "
        f"analysis.json. Skip Δloss: increase of the next-token loss when only that unit is skipped. ↑/↓: a high/low "
        f"value marks an important layer.\n\n"
        + markdown_table(headers, rows)
        + "\n![heatmap](heatmap.png)\n\n![metrics](metrics.png)\n\n![angular distance](angular_distance.png)\n\n"
        + "![agreement](agreement.png)\n"
    )


# -- CoLa -------------------------------------------------------------------------------------------------------------
def chain_text(chain, num_layers: int) -> str:
    """A chain as per-layer run counts, e.g. '1 1 0 2 1' (layer 2 skipped, layer 3 looped)."""
    return " ".join(str(chain.count(layer)) for layer in range(num_layers))


def cola_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per problem of a CoLa result: was the full model right, the shortest chain that kept the answer, and
    whether a chain fixed a wrong one."""
    headers = ["#", "answer", "full model right", "shortest chain keeping the answer", "chain (layer x times)",
               "fixed a wrong answer", "chains evaluated", "time"]
    rows = []
    for index, problem in enumerate(result["problems"]):
        shortest = problem["shortest_kept"]
        rows.append([str(index), problem["answer"], "yes" if problem["full"]["kept"] else "no",
                     "-" if shortest is None else f"{shortest['layers']} layers",
                     "-" if shortest is None else chain_text(shortest["chain"], problem["num_layers"]),
                     "yes" if problem["fixed"] else "-", str(problem["evaluations"]), f"{problem['seconds']:.1f} s"])
    return headers, rows


def write_cola(result: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """``cola.json`` (every problem's chains) and ``cola.md`` (the summary and one row per problem)."""
    out = Path(out)
    summary, iterations = result["summary"], result["settings"]["iterations"]
    wrong = summary["problems"] - summary["full_model_right"]
    headers, rows = cola_rows(result)
    text = (f"# CoLa chain search, {result['model']}\n\n{iterations} MCTS iterations per problem; one forward pass per "
            f"distinct chain. Full model right on {summary['full_model_right']} of {summary['problems']}; a shorter "
            f"chain kept the answer on {summary['right_with_a_shorter_chain']} of those; a chain fixed "
            f"{summary['wrong_fixed_by_a_chain']} of {wrong} wrong answers. {summary['evaluations']} chains in "
            f"{summary['seconds']:.0f} s.\n\n" + markdown_table(headers, rows))
    return {"json": write_json(out / "cola.json", dict(result)), "markdown": write_text(out / "cola.md", text)}


# -- the demo ---------------------------------------------------------------------------------------------------------
def demo_rows(result: Mapping[str, Any], *, describe: bool = True) -> tuple[list[str], list[list[str]]]:
    """The demo's headline (``demo.json``, :func:`skiplm.demo.run_demo`): one row per configuration — what it is
    (``describe``), held-out perplexity on each corpus (and its multiple of the full model's), and its speed against
    the full model in the same run (speculative decoding: whole generations against plain greedy; plans: decode
    steps, paired)."""
    corpora = list(result["corpora"])
    headers = ["config"] + (["what it is"] if describe else []) + [f"held-out ppl, {c}" for c in corpora] + [
        "speed vs full model (same run)"]
    rows = []
    for row in result["rows"]:
        if row.get("lossless"):
            cells = [f"{row['perplexity'][c]:.2f} (= full: lossless)" for c in corpora]
        elif row["name"] == FULL:
            cells = [f"{row['perplexity'][c]:.2f}" for c in corpora]
        else:
            cells = [f"{row['perplexity'][c]:.2f} ({row['perplexity_x_full'][c]:.2f}x)" for c in corpora]
        rows.append([row["name"], *([row["what"]] if describe else []), *cells, demo_speed_text(row["speed"])])
    return headers, rows


def demo_speed_text(speed: Mapping[str, Any]) -> str:
    """One demo row's speed in words: ``speed["kind"]`` is "reference" (the full model: its plain greedy and
    decode rates), "generation" (whole generations against plain greedy) or "decode" (decode steps, paired)."""
    if speed["kind"] == "reference":
        return (f"1.00x ({speed['generation_tokens_per_s']:.1f} tok/s plain greedy, "
                f"{speed['decode_tokens_per_s']:.1f} tok/s decode b1)")
    if speed["kind"] == "generation":
        return (f"{speed['speedup']:.2f}x ({speed['tokens_per_s']:.1f} vs {speed['plain_tokens_per_s']:.1f} tok/s, "
                "whole generations)")
    low, high = speed["ci95"]
    return f"{speed['speedup']:.2f}x decode b1 (95% CI {low:.2f}-{high:.2f}; {speed['tokens_per_s']:.1f} tok/s)"


def demo_markdown(result: Mapping[str, Any]) -> str:
    """The demo's ``summary.md``: the headline table, what was measured and how, the timings, what to try next."""
    headers, rows = demo_rows(result)
    spec, seconds = result["speculative"], result["seconds"]
    stages = ", ".join(f"{name.replace('_', ' ')} {value:.0f} s" for name, value in seconds.items() if name != "total")
    notes = "\n".join(f"- {line}" for line in result["notes"])
    steps = "\n".join(f"- `{command}` — {why}" for command, why in result["next"])
    return (f"# skiplm demo, {result['model']}\n\n{result['machine']['cpu']}, {result['machine']['torch_threads']} "
            f"threads, torch {result['machine']['torch']}; {result['created']}.\n\n"
            + markdown_table(headers, rows)
            + f"\n{notes}\n\nSpeculative output identical to plain greedy: {spec['identical_rows']} of {spec['rows']} "
            f"generations, token for token.\n\nWall time {seconds['total']:.0f} s ({stages}).\n\n"
            f"## What to try next\n\n{steps}\n")
