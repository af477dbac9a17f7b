"""A long-lived decoder as a user keeps one: a fresh `SpeculativeDecoder` (int8-dynamic draft, the default speed
monitor on, no warm-up of our own) decodes 16 GSM8K chat prompts one after another at batch 1, each paired with plain
greedy decoding of the same prompt (alternating which goes first). Then the same 16 prompts again, everything warm:
the warm benchmark. Reports per generation the speedup, fallbacks and warm-ups the monitor recorded, the speedup of
the first pass against the warm one (the aim: never more than 10% below it), and whether every output was plain
greedy's, token for token. Writes kept.json, kept.md and kept.png beside this file (or into --out).

    .venv/bin/python benchmarks/user-speed/kept.py --prompts 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft-dtype", default="int8-dynamic")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from skiplm.models.loading import load_model
    from skiplm.speculative import SpeculativeDecoder, plain_generate
    from skiplm.speculative.bench import prompt_set

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    eos = [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = prompt_set(tokenizer, "gsm8k", args.prompts)
    start = time.perf_counter()
    decoder = SpeculativeDecoder(model, draft_dtype=args.draft_dtype)  # as a user makes one; setup timed apart
    setup_s = time.perf_counter() - start
    passes = []
    for name in ("first", "warm"):
        rows = []
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            timings, outputs = {}, {}
            for which in (("plain", "speculative") if i % 2 == 0 else ("speculative", "plain")):
                t = time.perf_counter()
                if which == "plain":
                    outputs[which] = plain_generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=eos,
                                                    pad_token_id=pad)[0]
                else:
                    result = decoder.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=pad)
                    outputs[which], stats = result.tokens[0], result.stats
                timings[which] = time.perf_counter() - t
            rows.append({"prompt": i, "tokens": len(outputs["plain"]), "plain_s": timings["plain"],
                         "speculative_s": timings["speculative"], "speedup": timings["plain"] / timings["speculative"],
                         "identical": outputs["plain"] == outputs["speculative"], "rounds": stats.rounds,
                         "plain_steps": stats.plain_steps, "fallbacks": stats.fallbacks,
                         "acceptance": stats.acceptance_rate})
            print(f"{name} #{i}: {rows[-1]['speedup']:.2f}x, {stats.rounds} rounds, {stats.fallbacks} fallbacks, "
                  f"identical={rows[-1]['identical']}", flush=True)
        passes.append({"name": name, "rows": rows,
                       "speedup": sum(r["plain_s"] for r in rows) / sum(r["speculative_s"] for r in rows),
                       "median_generation_speedup": statistics.median(r["speedup"] for r in rows),
                       "lowest_generation_speedup": min(r["speedup"] for r in rows),
                       "fallbacks": sum(r["fallbacks"] for r in rows)})
    first, warm = passes
    ratio = first["speedup"] / warm["speedup"]
    identical = sum(r["identical"] for p in passes for r in p["rows"])
    monitor = decoder.monitors.get(1)
    summary = {"settings": {**vars(args), "out": str(args.out), "date": time.strftime("%Y-%m-%d %H:%M"),
                            "command": " ".join(["python", *sys.argv])},
               "setup_s": setup_s, "setup": decoder.setup.to_json() if hasattr(decoder.setup, "to_json") else None,
               "first_vs_warm": ratio, "identical": f"{identical}/{2 * len(prompts)}", "passes": passes,
               "monitor_events": monitor.events if monitor is not None else [],
               "monitor_warmups": monitor.warmups if monitor is not None else []}
    decoder.close()
    (args.out / "kept.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = [f"| {p['name']} | {p['speedup']:.3f}x | {p['median_generation_speedup']:.3f}x | "
             f"{p['lowest_generation_speedup']:.3f}x | {p['fallbacks']} |" for p in passes]
    (args.out / "kept.md").write_text(
        f"# A kept `SpeculativeDecoder` ({args.draft_dtype} draft), {len(prompts)} GSM8K chat prompts x "
        f"{args.new_tokens} new tokens, batch 1, each paired with plain greedy\n\n"
        "| pass | speedup (total time) | median generation | lowest generation | fallbacks |\n|---|---|---|---|---|\n"
        + "\n".join(table) +
        f"\n\nFirst pass (a fresh decoder, setup {setup_s:.2f} s apart) against the warm pass: **{ratio:.3f}** "
        f"(aim: at least 0.90). Outputs identical to plain greedy: {summary['identical']}.\n\n"
        f"`.venv/bin/python benchmarks/user-speed/kept.py {' '.join(sys.argv[1:])}` regenerates it.\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for p in passes:
        ax.plot([r["prompt"] for r in p["rows"]], [r["speedup"] for r in p["rows"]], marker="o",
                label=f"{p['name']} pass ({p['speedup']:.2f}x)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("generation (prompt)")
    ax.set_ylabel("speedup over plain greedy")
    ax.legend(fontsize=8)
    ax.set_title(f"kept decoder: first pass {ratio:.2f} of the warm pass", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "kept.png", dpi=120)
    print(f"wrote {args.out / 'kept.md'}")


if __name__ == "__main__":
    main()
