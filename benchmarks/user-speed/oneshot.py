"""One-shot CLI speed as a user meets it: the same greedy generation run as whole `skiplm generate` processes,
plain and speculative, alternating (A B A B ...), each timed from process start to exit. Reports per process the wall
time (Python start, imports, model load, setup and decoding: what the user waits for) and the decoding wall time the
command itself reports on stderr (after the model is loaded, setup included), the speedups of their medians, and
whether every speculative output was the plain one, character for character. Writes oneshot.json, oneshot.md and
oneshot.png beside this file (or into --out).

    .venv/bin/python benchmarks/user-speed/oneshot.py --pairs 5 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SKIPLM = ROOT / ".venv" / "bin" / "skiplm"
# the first GSM8K test question (the prompt every process answers)
PROMPT = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
          "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
          "egg. How much in dollars does she make every day at the farmers' market?")


def run(extra: list[str], tokens: int, threads: int) -> dict:
    """One `skiplm generate` process: its wall time, its output and the timing line it printed."""
    command = [str(SKIPLM), "generate", "-p", PROMPT, "--max-new-tokens", str(tokens), "--threads", str(threads),
               *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return {"wall_s": wall, "text": done.stdout, "stderr": done.stderr, "decode_s": decode_seconds(done.stderr)}


def decode_seconds(stderr: str) -> float | None:
    """The generation time `skiplm generate` reports, setup included: "(X.XX s in all)" after a speculative one,
    "N tokens in X.XX s" after a plain one."""
    found = re.findall(r"\(([0-9.]+) s in all\)", stderr) or re.findall(r"tokens in ([0-9.]+) s", stderr)
    return float(found[-1]) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="plain / speculative process pairs, alternating")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", nargs="*", default=["--draft-dtype", "int8-dynamic"],
                        help="draft options of the speculative command")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = {"plain": [], "speculative": ["--speculative", *args.draft]}
    # not measured: the first speculative process fills the draft cache, as a user's first run does
    first = run(variants["speculative"], args.max_new_tokens, args.threads)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for pair in range(args.pairs):
        order = list(variants) if pair % 2 == 0 else list(reversed(variants))
        for name in order:
            runs[name].append(run(variants[name], args.max_new_tokens, args.threads))
            print(f"{name}: {runs[name][-1]['wall_s']:.2f} s (decode {runs[name][-1]['decode_s']})", flush=True)
    plain_text = runs["plain"][0]["text"]
    identical = sum(r["text"] == plain_text for r in runs["speculative"] + runs["plain"])
    medians = {name: {key: statistics.median(r[key] for r in rs if r[key] is not None) for key in ("wall_s",
                                                                                                   "decode_s")}
               for name, rs in runs.items()}
    summary = {
        "settings": {**vars(args), "out": str(args.out), "date": time.strftime("%Y-%m-%d %H:%M"),
                     "prompt": PROMPT, "command": " ".join([sys.executable, *sys.argv])},
        "first_speculative_process": {k: first[k] for k in ("wall_s", "decode_s")},
        "medians": medians,
        "wall_speedup": medians["plain"]["wall_s"] / medians["speculative"]["wall_s"],
        "decode_speedup": medians["plain"]["decode_s"] / medians["speculative"]["decode_s"],
        "identical_outputs": f"{identical}/{2 * args.pairs}",
        "runs": {name: [{k: r[k] for k in ("wall_s", "decode_s")} for r in rs] for name, rs in runs.items()},
        "speculative_stderr": runs["speculative"][-1]["stderr"][-1500:],
        "text": plain_text,
    }
    (args.out / "oneshot.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [f"| {name} | {m['wall_s']:.2f} | {m['decode_s']:.2f} | "
            + ", ".join(f"{r['wall_s']:.2f}" for r in runs[name]) + " |" for name, m in medians.items()]
    (args.out / "oneshot.md").write_text(
        f"# One-shot `skiplm generate`, {args.max_new_tokens} new tokens, {args.pairs} alternating process pairs\n\n"
        "| command | median wall (s) | median decode (s) | every process's wall (s) |\n|---|---|---|---|\n"
        + "\n".join(rows) +
        f"\n\nSpeculative (`{' '.join(variants['speculative'])}`) vs plain: **{summary['wall_speedup']:.2f}x** on "
        f"whole-process wall time, **{summary['decode_speedup']:.2f}x** on the decoding time the command reports "
        f"(setup included, model load excluded). Outputs identical to the plain one: {summary['identical_outputs']}. "
        f"The first speculative process (filling the draft cache, not in the table): {first['wall_s']:.2f} s.\n\n"
        f"`{summary['settings']['command'].replace(sys.executable, '.venv/bin/python')}` regenerates it.\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, name in enumerate(runs):
        ax.scatter([i] * len(runs[name]), [r["wall_s"] for r in runs[name]], label=f"{name} (wall)")
        ax.scatter([i + 0.15] * len(runs[name]), [r["decode_s"] for r in runs[name]], marker="x",
                   label=f"{name} (decode)")
    ax.set_xticks([0.07, 1.07], list(runs))
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title(f"one-shot skiplm generate, {args.max_new_tokens} tokens: wall {summary['wall_speedup']:.2f}x, "
                 f"decode {summary['decode_speedup']:.2f}x", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "oneshot.png", dpi=120)
    print(f"wrote {args.out / 'oneshot.md'}")


if __name__ == "__main__":
    main()
