"""The GGUF benchmark, measured in llama.cpp: skiplm's exported block plans (unhealed and healed) against the shipped
full-depth GGUF, layer-wise against uniform precision at the same file size, and a pruned GGUF as llama.cpp's own
speculative draft for the full one. Writes results.json, results.md and results.png beside this file.

    .venv/bin/python benchmarks/gguf/measure.py --bin ~/.cache/skiplm/llama.cpp/build/bin   (run.sh calls it)

Every GGUF is written by skiplm.export.gguf.export_gguf (what `skiplm export --format gguf` runs). Speeds come from
llama-bench (every model in one run, `-r` repeats, ratios to the full model of the same run); perplexity from
llama-perplexity on held-out pydoc and GSM8K text (healing trained on text the full model generated itself, the
block-influence plans were fitted on that text too, so both corpora are held out from everything); speculative
decoding from llama-speculative against llama-completion on the same chat prompts, greedy, both timed by llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TARGETS = ("1.1", "1.2", "1.3")
# Same file size, two ways: one type everywhere, or two types by block importance (ZD from the weights, LIM from
# calibration text). 5.0 bits: the shipped Q4_1 against a Q4_0/Q5_0 mix; 5.5 bits: Q5_0 against a Q4_0/Q8_0 mix.
PRECISIONS = [("q4_1 (shipped)", None, None), ("layerwise:5.0:q4_0,q5_0", "zd", 5.0),
              ("layerwise:5.0:q4_0,q5_0", "lim", 5.0), ("q5_0", None, 5.5), ("layerwise:5.5:q4_0,q8_0", "zd", 5.5),
              ("layerwise:5.5:q4_0,q8_0", "lim", 5.5), ("q4_0", None, 4.5)]


def run(command: list, timeout: float = 1800) -> tuple[str, str]:
    """(stdout, stderr) of a llama.cpp tool; a failure stops the benchmark with the tool's own message."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout, done.stderr


def write_texts(work: Path, tokenizer) -> dict[str, Path]:
    """The held-out corpora as text files for llama-perplexity, and GSM8K chat prompts for generation."""
    from skiplm.models.data import gsm8k_questions, load_corpus

    texts = {}
    for corpus in ("pydoc", "gsm8k"):
        path = work / f"{corpus}.txt"
        if not path.exists():
            path.write_text(load_corpus(corpus)[:200_000])
        texts[corpus] = path
    prompts = []
    for i, question in enumerate(gsm8k_questions(4)):
        path = work / f"prompt-{i}.txt"
        path.write_text(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                      add_generation_prompt=True, tokenize=False))
        prompts.append(path)
    texts["prompts"] = prompts
    return texts


def export_models(work: Path, heal_dir: Path, plans_dir: Path) -> tuple[list[dict], object]:
    """Every GGUF of the benchmark (made once; kept in ``work``), with what skiplm's export recorded."""
    import skiplm
    from skiplm import SkipPlan
    from skiplm.export.gguf import block_importance, export_gguf, source_gguf
    from skiplm.heal import load_healed
    from skiplm.planners.common import load_calibration

    model, tokenizer = skiplm.load_model()
    full = source_gguf(model)
    rows = [{"name": "full", "group": "plans", "path": str(full), "target": 1.0, "healed": None,
             "blocks": 30, "bytes": full.stat().st_size}]
    records_file = work / "exports.json"
    records = json.loads(records_file.read_text()) if records_file.exists() else {}

    def export(name, plan, **options):
        path = work / f"{name}.gguf"
        if name not in records or not path.exists():
            result = export_gguf(model, plan, path, **options)
            records[name] = result.record
            records_file.write_text(json.dumps(records, indent=2))
        return path, records[name]

    for target in TARGETS:
        plan = SkipPlan.load(plans_dir / f"block-influence-{target}.json")
        healed = load_healed(heal_dir / f"block-influence-{target}-lora")
        for name, options, healing in ((f"bi-{target}", {}, None),
                                       (f"bi-{target}-lora-q8_0", {"healed": healed}, "lora, changed tensors Q8_0"),
                                       (f"bi-{target}-lora-q4_1", {"healed": healed, "changed_type": "q4_1"},
                                        "lora, changed tensors Q4_1")):
            path, record = export(name, plan, **options)
            rows.append({"name": name, "group": "plans", "path": str(path), "target": float(target),
                         "healed": healing, "blocks": len(record["kept_blocks"]), "bytes": record["bytes"],
                         "bits_per_weight": record["block_bits_per_weight"],
                         "requantized": record["requantized_tensors"]})
    empty = SkipPlan.empty(30).for_model(model)
    importance = {"zd": block_importance(model, "zd"),
                  "lim": block_importance(model, "lim", load_calibration(tokenizer, "gsm8k", model=model))}
    for spec, metric, bits in PRECISIONS:
        if spec.endswith("(shipped)"):
            rows.append({"name": "full-q4_1", "group": "precision", "path": str(full), "precision": "Q4_1 (shipped)",
                         "importance": None, "bits_target": bits, "bytes": full.stat().st_size,
                         "bits_per_weight": 5.0})
            continue
        name = f"full-{spec.replace(':', '-').replace(',', '-')}" + (f"-{metric}" if metric else "")
        path, record = export(name, empty, precision=spec,
                              importance=importance[metric] if metric else None)
        rows.append({"name": name, "group": "precision", "path": str(path), "precision": record["precision"],
                     "importance": metric, "bits_target": bits or record["block_bits_per_weight"],
                     "bytes": record["bytes"], "bits_per_weight": record["block_bits_per_weight"],
                     "block_types": record["block_types"]})
    return rows, tokenizer


def bench(bin_dir: Path, rows: list[dict], threads: int, repeats: int) -> None:
    """Prompt (256 tokens) and decode (128 tokens) speed of every plan row, one llama-bench run."""
    plan_rows = [r for r in rows if r["group"] == "plans" and not (r["healed"] or "").endswith("Q4_1")]
    command = [bin_dir / "llama-bench", "-t", threads, "-p", 256, "-n", 128, "-r", repeats, "-o", "json"]
    for row in plan_rows:
        command += ["-m", row["path"]]
    results = json.loads(run(command)[0])
    for entry in results:
        row = next(r for r in plan_rows if Path(r["path"]).name == Path(entry["model_filename"]).name)
        key = "decode_tok_s" if entry["n_gen"] else "prompt_tok_s"
        row[key] = entry["avg_ts"]
        row[key.replace("tok_s", "sd")] = entry["stddev_ts"]
    full = rows[0]
    for row in plan_rows:
        row["decode_speedup"] = row["decode_tok_s"] / full["decode_tok_s"]
        row["prompt_speedup"] = row["prompt_tok_s"] / full["prompt_tok_s"]


def perplexity(bin_dir: Path, rows: list[dict], texts: dict, threads: int, chunks: int, context: int) -> None:
    for row in rows:
        for corpus in ("pydoc", "gsm8k"):
            _, output = run([bin_dir / "llama-perplexity", "-m", row["path"], "-f", texts[corpus], "-c", context,
                          "-b", context, "--chunks", chunks, "-t", threads])
            match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", output)
            if match is None:
                raise SystemExit(f"no perplexity in llama-perplexity's output for {row['name']}:\n{output[-2000:]}")
            row[f"ppl_{corpus}"] = float(match[1])
            row[f"ppl_{corpus}_se"] = float(match[2])
        print(f"  {row['name']}: pydoc {row['ppl_pydoc']:.3f}, gsm8k {row['ppl_gsm8k']:.3f}", flush=True)


def speculative(bin_dir: Path, rows: list[dict], prompts: list[Path], threads: int, tokens: int,
                repeats: int) -> list[dict]:
    """Each pruned draft in llama-speculative against plain llama-completion of the full model, alternating; the full
    GGUF drafting for itself is the reference for the text (llama.cpp's batched verification does not reproduce
    llama-completion's one-token steps bit for bit, so its greedy text can differ from both)."""
    full = rows[0]["path"]
    drafts = [{"name": "full (itself)", "path": full}] + [
        r for r in rows if r["name"] in ("bi-1.2", "bi-1.3", "bi-1.2-lora-q8_0", "bi-1.3-lora-q8_0")]
    common = ["-n", tokens, "--temp", 0, "-t", threads, "-s", 1]
    plain_runs, plain_text, self_text = [], {}, {}
    results = {d["name"]: {"draft": d["name"], "runs": [], "drafted": 0, "accepted": 0, "same_as_plain": 0,
                           "same_as_self": 0, "compared": 0} for d in drafts}
    for _ in range(repeats):
        for i, prompt in enumerate(prompts):
            text, log = run([bin_dir / "llama-completion", "-m", full, "-f", prompt, "-no-cnv", "--no-display-prompt",
                             *common])
            match = re.search(r" eval time =\s+([0-9.]+) ms /\s+(\d+) runs", log)
            plain_runs.append(int(match[2]) / (float(match[1]) / 1000))
            plain_text[i] = text.replace("[end of text]", "").strip()
            for draft in drafts:
                text, log = run([bin_dir / "llama-speculative", "-m", full, "-md", draft["path"], "-f", prompt,
                                 "--spec-draft-n-max", 4, "-td", threads, *common])
                match = re.search(r"decoded\s+(\d+) tokens in\s+([0-9.]+) seconds", log)
                entry = results[draft["name"]]
                entry["runs"].append(int(match[1]) / float(match[2]))
                entry["drafted"] += int(re.search(r"n_drafted\s*=\s*(\d+)", log)[1])
                entry["accepted"] += int(re.search(r"n_accept\s*=\s*(\d+)", log)[1])
                entry["compared"] += 1
                generated = text.split("<|im_start|>assistant\n", 1)[-1].replace("[end of text]", "").strip()
                self_text.setdefault(i, generated)  # the self-drafted run comes first
                entry["same_as_plain"] += int(generated == plain_text[i])
                entry["same_as_self"] += int(generated == self_text[i])
    plain = sum(plain_runs) / len(plain_runs)
    rows_out = [{"draft": "none (plain llama-completion)", "decode_tok_s": plain, "speedup": 1.0}]
    for entry in results.values():
        speed = sum(entry["runs"]) / len(entry["runs"])
        rows_out.append({"draft": entry["draft"], "decode_tok_s": speed, "speedup": speed / plain,
                         "acceptance": entry["accepted"] / max(entry["drafted"], 1),
                         "same_as_plain": f"{entry['same_as_plain']}/{entry['compared']}",
                         "same_as_self": f"{entry['same_as_self']}/{entry['compared']}"})
    return rows_out


def write(rows: list[dict], spec_rows: list[dict], settings: dict) -> None:
    full = rows[0]
    for row in rows:
        for corpus in ("pydoc", "gsm8k"):
            row[f"ppl_{corpus}_x_full"] = row[f"ppl_{corpus}"] / full[f"ppl_{corpus}"]
    (HERE / "results.json").write_text(json.dumps({"settings": settings, "rows": rows, "speculative": spec_rows},
                                                  indent=2) + "\n")
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = ["# GGUF export in llama.cpp (default model, SmolLM2-135M-Instruct)", "",
             f"Measured {settings['date']} on {settings['cpu']}, {settings['threads']} threads; "
             f"`bash benchmarks/gguf/run.sh` regenerates it.", "",
             "## Block plans, unhealed and healed, against the full GGUF", "",
             "| GGUF | blocks | healed | MiB | prompt tok/s (256) | decode tok/s (128) | decode x full | "
             "ppl pydoc (x full) | ppl GSM8K (x full) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["group"] == "plans"):
        speed = (f"{row['prompt_tok_s']:.0f} | {row['decode_tok_s']:.1f} ± {row['decode_sd']:.1f} | "
                 f"{row['decode_speedup']:.2f}x" if "decode_tok_s" in row else "— | — | —")
        lines.append(f"| {row['name']} | {row['blocks']} | {row['healed'] or '—'} | {mib(row['bytes'])} | {speed} | "
                     f"{row['ppl_pydoc']:.2f} ({row['ppl_pydoc_x_full']:.2f}x) | "
                     f"{row['ppl_gsm8k']:.2f} ({row['ppl_gsm8k_x_full']:.2f}x) |")
    lines += ["", "## Layer-wise against uniform precision at the same size (full depth)", "",
              "| precision | importance | block bits/weight | MiB | ppl pydoc (x shipped) | ppl GSM8K (x shipped) |",
              "|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["group"] == "precision"):
        lines.append(f"| {row['precision']} | {row['importance'] or '—'} | {row['bits_per_weight']:.2f} | "
                     f"{mib(row['bytes'])} | {row['ppl_pydoc']:.2f} ({row['ppl_pydoc_x_full']:.3f}x) | "
                     f"{row['ppl_gsm8k']:.2f} ({row['ppl_gsm8k_x_full']:.3f}x) |")
    lines += ["", "## A pruned GGUF as llama.cpp's speculative draft for the full GGUF", "",
              f"{settings['prompts']} GSM8K chat prompts x {settings['spec_repeats']} rounds, {settings['tokens']} "
              "new tokens, greedy; llama-speculative (draft up to 4 tokens) against llama-completion, each timed "
              "by llama.cpp (decode only).", "",
              "| draft | decode tok/s | x plain | acceptance | same text as llama-completion | same text as "
              "the self-drafted run |", "|---|---|---|---|---|---|"]
    for row in spec_rows:
        acceptance = f"{row['acceptance']:.2f}" if "acceptance" in row else "—"
        lines.append(f"| {row['draft']} | {row['decode_tok_s']:.1f} | {row['speedup']:.2f}x | {acceptance} | "
                     f"{row.get('same_as_plain', '—')} | {row.get('same_as_self', '—')} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {"unhealed": lambda r: r["healed"] is None and r["name"] != "full",
              "healed (Q8_0 changed)": lambda r: (r["healed"] or "").endswith("Q8_0"),
              "healed (Q4_1 changed)": lambda r: (r["healed"] or "").endswith("Q4_1")}
    plans = [r for r in rows if r["group"] == "plans"]
    for label, keep in series.items():
        points = [r for r in plans if keep(r) and "decode_speedup" in r]
        if points:
            axes[0].plot([r["decode_speedup"] for r in points], [r["ppl_gsm8k_x_full"] for r in points], "o-",
                         label=label)
    axes[0].plot([1.0], [1.0], "k*", markersize=12, label="full (shipped Q4_1)")
    axes[0].set_xlabel("decode speed in llama.cpp (x full)")
    axes[0].set_ylabel("held-out GSM8K perplexity (x full)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    precision = [r for r in rows if r["group"] == "precision"]
    labels = [f"{r['precision'].replace('layer-wise ', 'lw ').split(' bits')[0]}\n{r['importance'] or ''}"
              for r in precision]
    axes[1].bar(range(len(precision)), [r["ppl_pydoc_x_full"] for r in precision], color="tab:blue", width=0.4,
                label="pydoc")
    axes[1].bar([i + 0.4 for i in range(len(precision))], [r["ppl_gsm8k_x_full"] for r in precision],
                color="tab:orange", width=0.4, label="GSM8K")
    axes[1].set_xticks([i + 0.2 for i in range(len(precision))], labels, fontsize=6)
    axes[1].axhline(1.0, color="k", linewidth=0.5)
    axes[1].set_ylabel("perplexity (x shipped Q4_1)")
    axes[1].set_title("full depth: uniform vs layer-wise precision", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "results.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin (scripts/llama-cpp.sh)")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "gguf-work")
    parser.add_argument("--heals", type=Path, default=ROOT / "results" / "heal-work" / "heals")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--spec-repeats", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print("exporting GGUFs (skiplm.export.gguf) ...", flush=True)
    rows, tokenizer = export_models(args.work, args.heals, ROOT / "benchmarks" / "heal" / "sweep" / "plans")
    texts = write_texts(args.work, tokenizer)
    print("speed (llama-bench) ...", flush=True)
    bench(args.bin, rows, args.threads, args.repeats)
    print("perplexity (llama-perplexity) ...", flush=True)
    perplexity(args.bin, rows, texts, args.threads, args.chunks, args.context)
    print("speculative (llama-speculative vs llama-completion) ...", flush=True)
    spec_rows = speculative(args.bin, rows, texts["prompts"], args.threads, args.tokens, args.spec_repeats)
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    settings = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "threads": args.threads, "repeats": args.repeats,
                "perplexity": {"context": args.context, "chunks": args.chunks}, "tokens": args.tokens,
                "prompts": len(texts["prompts"]), "spec_repeats": args.spec_repeats,
                "minutes": round((time.time() - started) / 60, 1), "command": " ".join(sys.argv)}
    write(rows, spec_rows, settings)
    print(f"wrote {HERE / 'results.md'} ({settings['minutes']} min)")


if __name__ == "__main__":
    main()
