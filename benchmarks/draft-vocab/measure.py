"""Reduced-vocabulary draft heads on the default model, measured alone: the lean int8-dynamic draft's step time at
batch 1 for each vocabulary size (the sizes alternating, one token after a 64-token prompt, median of many steps), the
head product's share of it, and how much of held-out text each token set covers (the first half of gsm8k and pydoc:
the vocabulary is counted on the second half). Then, from the paired `skiplm bench-speculative` run in the same
folder (speculative.json), acceptance and speedup per size; writes draft-vocab.json / .md / .png.

    flock /tmp/skiplm-cpu.lock .venv/bin/python benchmarks/draft-vocab/measure.py SIZE[,SIZE...] OUT
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from skiplm.models.data import load_corpus
from skiplm.models.loading import load_model
from skiplm.report.files import machine_info, markdown_table, write_json
from skiplm.models.generation import left_pad
from skiplm.speculative.bench import prompt_set
from skiplm.speculative.decoder import plain_generate
from skiplm.speculative.lean import LeanDraft
from skiplm.speculative.vocab import draft_vocabulary

PRECISION = "int8-dynamic"
STEPS = 40  # timed single-token steps per size and round
ROUNDS = 5


def held_out_coverage(tokenizer, vocab) -> dict[str, float]:
    """The fraction of the first half of each corpus (never counted) whose tokens the set holds."""
    found = {}
    for name in ("gsm8k", "pydoc"):
        text = load_corpus(name)
        paragraphs = [p + "\n\n" for p in text[:len(text) // 2].split("\n\n") if p]
        ids = torch.tensor([i for row in tokenizer(paragraphs, add_special_tokens=False).input_ids for i in row])
        found[name] = 1.0 if vocab is None else float(torch.isin(ids, vocab.ids).float().mean())
    return found


def output_coverage(model, tokenizer, vocabs, limit: int, new_tokens: int) -> dict[int, dict[str, float]]:
    """The fraction of plain greedy decoding's own output tokens on the benchmark's prompts (the same prompt sets,
    limit and length) that each set holds: what a draft over that set can propose at all."""
    outputs = {}
    for name in ("gsm8k", "pydoc"):
        tokens = []
        for prompt in prompt_set(tokenizer, name, limit):
            ids, mask = left_pad([prompt], tokenizer.pad_token_id or 0)
            tokens += plain_generate(model, ids, mask, max_new_tokens=new_tokens,
                                     eos_token_id=tokenizer.eos_token_id)[0]
        outputs[name] = torch.tensor(tokens)
    return {n: {name: 1.0 if v is None else float(torch.isin(ids, v.ids).float().mean())
                for name, ids in outputs.items()} for n, v in vocabs.items()}


def step_times(model, tokenizer, sizes) -> dict[int, dict[str, float]]:
    rows = model.get_output_embeddings().weight.shape[0]
    vocabs = {n: draft_vocabulary(tokenizer, n, vocab_size=rows) for n in sizes}
    drafts = {n: LeanDraft(model, PRECISION, vocab=v.ids if v is not None else None) for n, v in vocabs.items()}
    for draft in drafts.values():
        draft.warm_up()
    prompt = tokenizer(load_corpus("pydoc")[-4000:], return_tensors="pt").input_ids[:, :64]
    mask = torch.ones(1, 64 + STEPS + 1, dtype=torch.long)
    positions = torch.arange(64 + STEPS + 1)[None]
    seconds = {n: [] for n in sizes}
    head_seconds = {n: [] for n in sizes}
    for round_index in range(ROUNDS):
        order = sizes if round_index % 2 == 0 else sizes[::-1]
        for n in order:
            draft = drafts[n]
            logits, cache = draft(prompt, mask[:, :64], positions[:, :64], None)
            token = logits[:, -1].argmax(-1, keepdim=True)
            for step in range(STEPS):
                end = 65 + step
                start = time.perf_counter()
                logits, cache = draft(token, mask[:, :end], positions[:, end - 1:end], cache)
                token = logits[:, -1].argmax(-1, keepdim=True)
                seconds[n].append(time.perf_counter() - start)
            hidden = torch.randn(1, model.config.hidden_size)
            for _ in range(STEPS):
                start = time.perf_counter()
                draft.head.product(hidden)
                head_seconds[n].append(time.perf_counter() - start)
    return {n: {"step_ms": 1e3 * statistics.median(seconds[n]), "head_ms": 1e3 * statistics.median(head_seconds[n]),
                "head_rows": drafts[n].head.out_features, "weight_mib": drafts[n].weight_bytes / 2**20,
                "coverage_counted": vocabs[n].coverage if vocabs[n] is not None else 1.0,
                "coverage_held_out": held_out_coverage(tokenizer, vocabs[n])}
            for n in sizes}


def name_of(size: int) -> str:
    return PRECISION if size == 0 else f"{PRECISION}-v{size}"


def main(sizes_arg: str, out: str) -> None:
    sizes = [int(s) for s in sizes_arg.split(",")]
    out = Path(out)
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m")
    measured = step_times(model, tokenizer, sizes)
    bench = json.loads((out / "speculative.json").read_text())
    rows_in_head = model.get_output_embeddings().weight.shape[0]
    covered = output_coverage(model, tokenizer, {n: draft_vocabulary(tokenizer, n, vocab_size=rows_in_head)
                                                 for n in sizes},
                              bench["settings"]["limit"], bench["settings"]["new_tokens"])
    for n in sizes:
        measured[n]["coverage_greedy_outputs"] = covered[n]
    rows, table = [], []
    for n in sizes:
        entry = {"size": n or model.get_output_embeddings().weight.shape[0], "full": n == 0, **measured[n]}
        for key, result in bench["results"].items():
            d = result[name_of(n)]
            entry[key] = {"speedup": d["speedup"], "acceptance": d["acceptance_rate"],
                          "tokens_per_round": d["tokens_per_round"], "identical_rows": d["identical_rows"],
                          "rows": result["rows"] * bench["settings"]["repeats"],
                          "draft_ms_per_token": 1e3 * d["draft_seconds"] / max(_drafted(d), 1)}
        rows.append(entry)
        table.append([f"{entry['size']:,}" + (" (full)" if n == 0 else ""), f"{entry['step_ms']:.2f}",
                      f"{entry['head_ms']:.3f}", f"{entry['weight_mib']:.0f}",
                      f"{entry['coverage_held_out']['gsm8k']:.2%} / {entry['coverage_held_out']['pydoc']:.2%}",
                      f"{entry['coverage_greedy_outputs']['gsm8k']:.2%} / "
                      f"{entry['coverage_greedy_outputs']['pydoc']:.2%}"]
                     + [f"{entry[k]['acceptance']:.1%}, {entry[k]['speedup']:.3f}x, "
                        f"{entry[k]['identical_rows']}/{entry[k]['rows']}" for k in bench["results"]])
    result = {"kind": "draft-vocab", "precision": PRECISION, "machine": machine_info("cpu"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "steps_per_size_and_round": STEPS, "rounds": ROUNDS, "sizes": rows,
              "bench_command": bench["settings"]["command"]}
    write_json(out / "draft-vocab.json", result)
    headers = ["draft vocabulary", "draft step ms", "head ms", "draft MiB", "held-out text covered gsm8k / pydoc",
               "greedy outputs covered gsm8k / pydoc"] + \
        [f"{k}: acceptance, speedup, identical" for k in bench["results"]]
    (out / "draft-vocab.md").write_text(
        f"# Reduced-vocabulary draft heads, {PRECISION} lean draft, SmolLM2-135M, batch 1\n\n"
        f"{result['machine']['cpu']}, {result['machine']['torch_threads']} threads, {result['date']}. Step and head "
        f"times: medians of {STEPS} x {ROUNDS} single-token steps per size, sizes alternating, alone. Acceptance and "
        "speedup: the paired `skiplm bench-speculative` run (speculative.md).\n\n" + markdown_table(headers, table)
        + "\n![draft vocabulary](draft-vocab.png)\n")
    plot(rows, list(bench["results"]), out / "draft-vocab.png")


def _drafted(d) -> int:
    """Drafted tokens at batch 1 (acceptance = accepted / drafted; tokens / round = kept / rounds + 1)."""
    accepted = d["mean_accepted_per_round"] * d["rounds"]
    return round(accepted / d["acceptance_rate"]) if d["acceptance_rate"] else 0


def plot(rows, keys, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['size']:,}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(labels, [r["step_ms"] for r in rows], color="#4c72b0", label="draft step")
    axes[0].bar(labels, [r["head_ms"] for r in rows], color="#dd8452", label="of which the head")
    axes[0].set_ylabel("ms (batch 1)")
    axes[0].set_title("lean int8-dynamic draft step")
    axes[0].legend()
    for key in keys:
        axes[1].plot(labels, [r[key]["acceptance"] for r in rows], marker="o", label=key)
        axes[2].plot(labels, [r[key]["speedup"] for r in rows], marker="o", label=key)
    axes[1].set_title("draft acceptance")
    axes[2].set_title("speedup over plain greedy")
    axes[2].axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xlabel("draft vocabulary (tokens)")
    axes[1].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
