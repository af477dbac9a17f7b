"""The healing benchmark's one table, from what run.sh measured: results.json, results.md and frontier.png in the
benchmark folder. Per plan (method x target) and healing (none, bridge, lora, bridge+lora): held-out perplexity on
pydoc and GSM8K (eval/eval.json: one run), measured decode speedup at batch 1 paired with the full model (bench/:
one run; a LoRA heal unmerged and merged), greedy agreement with the full model (agree/: one run), and the
training's tokens and minutes (each heal folder's provenance). agree/: greedy agreement (mean share of the full model's
48 tokens matched before the first difference, 8 GSM8K chat prompts).

    .venv/bin/python benchmarks/heal/summarize.py benchmarks/heal results/heal-work
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEALINGS = ("none", "bridge", "lora", "bridge+lora")


def _row_name(plan: str, healing: str) -> str:
    return plan if healing == "none" else f"{plan}-{healing} (healed)"


def main(out: Path, work: Path) -> None:
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    bench = json.loads((out / "bench" / "bench.json").read_text())
    agree = json.loads((out / "agree" / "agreement.json").read_text())
    corpora = evaluation["settings"]["corpora"]
    ppl = evaluation["perplexity"]
    full = {c: ppl[c]["full"]["perplexity"] for c in corpora}
    speed = bench["speed"]
    agreement = {name: entry.get("prefix_agreement") for name, entry in agree["summary"].items()}

    rows = []
    for plan_file in sorted((out / "sweep" / "plans").glob("*.json")):
        plan = plan_file.stem
        method, target = plan.rsplit("-", 1)
        for healing in HEALINGS:
            name = _row_name(plan, healing)
            if name not in ppl[corpora[0]]:
                continue
            row = {"method": method, "target": float(target), "healing": healing,
                   "perplexity": {c: ppl[c][name]["perplexity"] for c in corpora},
                   "perplexity_ratio": {c: ppl[c][name]["perplexity"] / full[c] for c in corpora},
                   "decode_speedup": speed[name]["decode_b1"]["speedup"],
                   "decode_speedup_ci95": speed[name]["decode_b1"]["speedup_ci95"]}
            merged = speed.get(f"{name}, merged")
            if merged:
                row["decode_speedup_merged"] = merged["decode_b1"]["speedup"]
            heal_name = name.removesuffix(" (healed)")
            row["agreement"] = agreement.get(name)
            if healing != "none":
                record = json.loads((work / "heals" / heal_name / "heal.json").read_text())["provenance"]
                trained = record.get(healing.split("+")[-1], {}).get("training")
                if trained:
                    row.update(training_tokens=trained["tokens"], training_minutes=round(trained["seconds"] / 60, 1),
                               training_steps=trained["steps"],
                               held_out_kl=[trained["evaluations"][0]["kl"], trained["held_out"]["kl"]])
                else:
                    row.update(training_tokens=0, training_minutes=round(record.get("seconds", 0) / 60, 2))
            rows.append(row)

    result = {"full_perplexity": full, "corpora": corpora, "rows": rows, "machine": bench.get("machine"),
              "commands": {"eval": evaluation.get("command"), "bench": bench.get("command"),
                           "agree": agree.get("command")}}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "frontier.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    corpora = result["corpora"]
    head = ["plan", "healing", *[f"{c} ppl (x full)" for c in corpora], "decode speedup b1 (merged)",
            "greedy agreement", "training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| full model | — | " + " | ".join(f"{result['full_perplexity'][c]:.2f} (1.00x)" for c in corpora)
             + " | 1.00x | 1.00 | — |"]
    for row in result["rows"]:
        speedup = f"{row['decode_speedup']:.2f}x"
        if "decode_speedup_merged" in row:
            speedup += f" ({row['decode_speedup_merged']:.2f}x)"
        training = "—"
        if row.get("training_steps"):
            training = f"{row['training_steps']} steps, {row['training_tokens']:,} tok, {row['training_minutes']} min"
        elif row["healing"] != "none":
            training = f"fit, {row['training_minutes'] * 60:.0f} s"
        agreement = "—" if row["agreement"] is None else f"{row['agreement']:.2f}"
        cells = [f"{row['method']} {row['target']:g}x", row["healing"],
                 *[f"{row['perplexity'][c]:.2f} ({row['perplexity_ratio'][c]:.2f}x)" for c in corpora],
                 speedup, agreement, training]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from skiplm.report.plots import pyplot, save_figure

    plt = pyplot()
    corpora = result["corpora"]
    figure, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for method in sorted({r["method"] for r in result["rows"]}):
            for healing, marker in zip(HEALINGS, "o^sD"):
                rows = sorted((r for r in result["rows"] if r["method"] == method and r["healing"] == healing),
                              key=lambda r: r["decode_speedup"])
                if rows:
                    ax.plot([r.get("decode_speedup_merged", r["decode_speedup"]) for r in rows],
                            [r["perplexity_ratio"][corpus] for r in rows], marker=marker, label=f"{method}, {healing}")
        ax.set_yscale("log")
        ax.set_xlabel("measured decode speedup, batch 1 (LoRA merged)")
        ax.set_ylabel(f"held-out perplexity / full model's ({corpus})")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    figure.suptitle("Healing skipped plans of SmolLM2-135M")
    save_figure(figure, path)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
