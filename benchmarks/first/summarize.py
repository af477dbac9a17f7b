"""The FiRST benchmark's one table, from what run.sh measured: results.json, results.md and frontier.png in the
benchmark folder. Per target (1.1 / 1.2 / 1.3x) and row (FiRST routers; the search and block-influence plans;
their LoRA-healed versions): held-out perplexity on pydoc and GSM8K (eval/eval.json: one run), decode and prefill
speedups at batch 1 and 8 paired with the full model (bench-<target>/bench.json: one run per target), what the
routers skipped (blocks per sequence, and at batch 8 the blocks every row skipped), and the training's steps and
minutes (each folder's provenance).

    .venv/bin/python benchmarks/first/summarize.py benchmarks/first results/first-work
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = ("1.1", "1.2", "1.3")
HEALS = Path("results/heal-work/heals")


def _rows_for(target: str) -> list[tuple[str, str, str, str | None]]:
    """(kind, eval row, bench row, folder) per row of one target."""
    # (`skiplm eval` names each router folder's rows by their folder, `skiplm bench` (one router per run) "first")
    rows = [("FiRST", f"first-{target}/first", "first", f"first-{target}")]
    if target == "1.2":
        rows.append(("FiRST, straight-through", "first-1.2-st/first", "first-1.2-st/first", "first-1.2-st"))
    for method in ("search", "block-influence"):
        rows.append((f"{method} plan", f"{method}-{target}", f"{method}-{target}", None))
    for method in ("search", "block-influence"):
        name = f"{method}-{target}-lora (healed)"
        rows.append((f"{method} + LoRA heal", name, name, f"{method}-{target}-lora"))
    return rows


def _speed(entry: dict | None) -> dict:
    if not entry:
        return {}
    return {measure: {"speedup": m["speedup"], "ci95": m["speedup_ci95"], "ideal": m.get("ideal_speedup"),
                      **({"router": m["policy"]} if "policy" in m else {})} for measure, m in entry.items()}


def _training(record: dict | None) -> dict | None:
    if not record:
        return None
    return {"steps": record["steps"], "tokens": record["tokens"], "minutes": round(record["seconds"] / 60, 1),
            "held_out_kl": [record["evaluations"][0]["kl"], record["held_out"]["kl"]]}


def main(out: Path, work: Path) -> None:
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    corpora = evaluation["settings"]["corpora"]
    ppl = evaluation["perplexity"]
    full = {c: ppl[c]["full"]["perplexity"] for c in corpora}
    rows, machine, commands = [], None, {"eval": evaluation.get("command")}
    for target in TARGETS:
        bench_file = out / f"bench-{target}" / "bench.json"
        bench = json.loads(bench_file.read_text()) if bench_file.is_file() else {"speed": {}}
        machine = machine or bench.get("machine")
        commands[f"bench-{target}"] = bench.get("command")
        for kind, eval_name, bench_name, folder in _rows_for(target):
            if eval_name not in ppl[corpora[0]]:
                continue
            row = {"target": float(target), "kind": kind, "row": eval_name,
                   "perplexity": {c: ppl[c][eval_name]["perplexity"] for c in corpora},
                   "perplexity_ratio": {c: ppl[c][eval_name]["perplexity"] / full[c] for c in corpora},
                   "speed": _speed(bench["speed"].get(bench_name))}
            merged = bench["speed"].get(f"{bench_name}, merged")
            if merged:
                row["speed_merged"] = _speed(merged)
            decisions = bench["speed"].get(f"{bench_name} (decisions only)")
            if decisions:
                row["speed_decisions_only"] = _speed(decisions)
            if kind.startswith("FiRST"):
                record = json.loads((work / folder / "first.json").read_text())
                prov = record["provenance"]
                row.update(threshold=record["threshold"], target_blocks=prov["target_blocks_per_sequence"],
                           calibrated_blocks=prov["calibrated_blocks_per_sequence"],
                           training=_training(prov["training"]), total_minutes=round(prov["seconds"] / 60, 1))
            elif folder:
                prov = json.loads((HEALS / folder / "heal.json").read_text())["provenance"]
                row.update(training=_training(prov["lora"]["training"]))
            rows.append(row)
    result = {"full_perplexity": full, "corpora": corpora, "rows": rows, "machine": machine, "commands": commands}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "frontier.png")
    print(markdown(result))


def _x(row: dict, measure: str) -> str:
    speed = row.get("speed_merged", row["speed"]).get(measure)
    return f"{speed['speedup']:.2f}x" if speed else "—"


def markdown(result: dict) -> str:
    corpora = result["corpora"]
    head = ["target", "row", *[f"{c} ppl (x full)" for c in corpora], "decode b1", "decode b8", "prefill b1",
            "prefill b8", "blocks skipped / sequence (b8: by every row)", "training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| — | full model | " + " | ".join(f"{result['full_perplexity'][c]:.2f} (1.00x)" for c in corpora)
             + " | 1.00x | 1.00x | 1.00x | 1.00x | 0 | — |"]
    for row in result["rows"]:
        cells = [f"{row['target']:.1f}x", row["kind"]]
        cells += [f"{row['perplexity'][c]:.2f} ({row['perplexity_ratio'][c]:.2f}x)" for c in corpora]
        decode_b1 = _x(row, "decode_b1")
        if "speed_merged" in row and "decode_b1" in row["speed"]:
            decode_b1 += f" (unmerged {row['speed']['decode_b1']['speedup']:.2f}x)"
        cells += [decode_b1, _x(row, "decode_b8"), _x(row, "prefill_b1"), _x(row, "prefill_b8")]
        router_b1 = row["speed"].get("decode_b1", {}).get("router")
        router_b8 = row["speed"].get("decode_b8", {}).get("router")
        if router_b1:
            b8 = router_b8.get("blocks_skipped_by_every_row") if router_b8 else None
            cells.append(f"{router_b1.get('skipped_blocks_per_token', 0):.1f} (b8: {b8:.1f})" if b8 is not None
                         else f"{router_b1.get('skipped_blocks_per_token', 0):.1f}")
        else:
            cells.append("fixed")
        training = row.get("training")
        cells.append(f"{training['steps']} steps, {training['minutes']} min, held-out KL {training['held_out_kl'][0]:.3f}"
                     f" -> {training['held_out_kl'][1]:.3f}" if training else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = result["corpora"]
    figure, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5))
    kinds = sorted({row["kind"] for row in result["rows"]})
    markers = dict(zip(kinds, "os^vDPX*"))
    for axis, corpus in zip(axes, corpora):
        for kind in kinds:
            points = sorted((row.get("speed_merged", row["speed"]).get("decode_b1", {}).get("speedup"),
                             row["perplexity_ratio"][corpus]) for row in result["rows"] if row["kind"] == kind
                            and "decode_b1" in row.get("speed_merged", row["speed"]))
            if points:
                axis.plot(*zip(*points), marker=markers[kind], label=kind)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel("measured decode speedup, batch 1 (LoRA heals merged)")
        axis.set_ylabel(f"held-out {corpus} perplexity (x full model)")
        axis.set_yscale("log")
        axis.set_title(corpus)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("SmolLM2-135M: FiRST routers vs static plans and LoRA-healed plans")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
