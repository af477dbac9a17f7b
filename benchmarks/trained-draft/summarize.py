"""Summarize benchmarks/trained-draft: the bench-speculative runs (one per prompt set) and the adapters' training
records, as results.json, results.md and results.png in the folder given (default: this script's folder)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: Path) -> None:
    runs = {"": json.loads((folder / "speculative.json").read_text())}
    trained = {p.name.split(".")[0]: json.loads(p.read_text()) for p in sorted(folder.glob("*.draft-adapter.json"))}
    rows = []
    for _, run in runs.items():
        for key, entry in run["results"].items():
            prompts, batch = key.rsplit("_b", 1)[0], int(key.rsplit("_b", 1)[1])
            for name, description in run["drafts"].items():
                d = entry[name]
                rows.append({
                    "prompts": prompts, "batch": batch, "draft": name, "description": description,
                    "speedup": d["speedup"], "speedup_per_round": d["speedup_per_round"],
                    "acceptance": d["acceptance_rate"], "tokens_per_round": d["tokens_per_round"],
                    "draft_ms_per_drafted_token": 1000 * d["draft_seconds"] / max(d.get("drafted", 0) or
                                                                                  _drafted(d), 1),
                    "plain_tokens_per_second": entry["plain"]["tokens_per_second"],
                    "tokens_per_second": d["tokens_per_second"], "identical_rows": d["identical_rows"],
                    "rows": entry["rows"] * run["settings"]["repeats"], "fallbacks": d["fallbacks"],
                    "whole_run_with_training": run["overall"][name]["speedup_with_search"],
                    "training_seconds": run["overall"][name]["search_seconds"],
                })
    training = {}
    for name, record in trained.items():
        t = record["training"]
        first, best = t["evaluations"][0], t["held_out"]
        training[name] = {"skip set": record["plan"], "seconds": t["seconds"], "steps": t["steps"],
                          "tokens": t["tokens"], "stopped": t["stopped"], "bf16": t["bf16"],
                          "rank": record["rank"], "adapted_linears": len(record["target_modules"]),
                          "held_out_before": {k: first[k] for k in ("kl", "acceptance", "agreement")},
                          "held_out_after": {k: best[k] for k in ("kl", "acceptance", "agreement")},
                          "data": t["data"]}
    machine = next(iter(runs.values()))["settings"]["machine"] if runs else {}
    (folder / "results.json").write_text(json.dumps({"rows": rows, "training": training, "machine": machine},
                                                    indent=1) + "\n")
    lines = ["# Trained drafts vs untrained drafts, SmolLM2-135M, batch 1", "",
             f"{machine.get('cpu')}, {machine.get('torch_threads')} threads, torch {machine.get('torch')}. "
             "Speedup: plain greedy time / speculative time in the same run (median of 2 alternating rounds); "
             "acceptance: drafted tokens the full model accepted; draft ms: draft time per drafted token.", "",
             "| prompts | draft | speedup | acceptance | tokens / round | draft ms / token | identical | "
             "whole run incl. training |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompts']} | {r['draft']} | {r['speedup']:.3f}x | {r['acceptance']:.0%} | "
                     f"{r['tokens_per_round']:.2f} | {r['draft_ms_per_drafted_token']:.1f} | "
                     f"{r['identical_rows']}/{r['rows']} | {r['whole_run_with_training']:.3f}x |")
    lines += ["", "Training (held-out: the last 8 of the 128 self-generated sequences):", "",
              "| adapter | skip set | steps | seconds | KL before -> after | acceptance proxy before -> after | "
              "top-1 agreement before -> after |", "|---|---|---|---|---|---|---|"]
    for name, t in training.items():
        b, a = t["held_out_before"], t["held_out_after"]
        lines.append(f"| {name} | {t['skip set']} | {t['steps']} | {t['seconds']:.0f} | {b['kl']:.3f} -> "
                     f"{a['kl']:.3f} | {b['acceptance']:.3f} -> {a['acceptance']:.3f} | {b['agreement']:.3f} -> "
                     f"{a['agreement']:.3f} |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, folder / "results.png")
    print("\n".join(lines))


def _drafted(d) -> int:
    """Drafted tokens (bench-speculative reports the acceptance rate and mean accepted per round; recover the count)."""
    accepted_per_round = d["mean_accepted_per_round"]
    rate = d["acceptance_rate"]
    return round(d["rounds"] * accepted_per_round / rate) if rate else 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["prompts"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2), squeeze=False)
    for ax, prompts in zip(axes[0], sets):
        mine = [r for r in rows if r["prompts"] == prompts]
        for r in mine:
            trained = r["draft"].endswith("lora")
            ax.scatter(r["acceptance"], r["speedup"], s=60, marker="o" if trained else "s",
                       color="tab:green" if trained else ("tab:gray" if "skip" in r["draft"] else "tab:blue"))
            ax.annotate(r["draft"], (r["acceptance"], r["speedup"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.axhline(1.0, color="black", lw=0.6, ls=":")
        ax.set_xlabel("acceptance (drafted tokens accepted)")
        ax.set_ylabel("speedup over plain greedy (batch 1)")
        ax.set_title(f"{prompts}: trained (green) vs untrained drafts")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
