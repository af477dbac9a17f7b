"""The LoRA-Drop benchmark's measurements on the default model, in one process per stage (run it under the shared
CPU lock; see run.sh):

* ``quality``: held-out perplexity of the full model and every row on pydoc and GSM8K (``--tokens`` tokens each,
  1024-token windows, stride 512; a LoRA-Drop row is scored by its teacher-forced view: every token as decode treats
  it, which the tests prove equal to step-by-step decoding) -> quality.json;
* ``speed``: prefill (128 tokens) and decode (64 new tokens after a 64-token prompt) at batch 1 and 8, every row
  paired with the full model in the same interleaved rounds (skiplm.measure.speed.run_bench: warm-up, repeats,
  median of paired ratios), a LoRA heal merged (``merge="restorable"``); then the KV-cache bytes each row holds after
  a 64-token prompt and ``--kv-tokens`` greedy steps at batch 1 -> speed.json;
* ``summary``: results.json, results.md and results.png from both.

    .venv/bin/python benchmarks/lora-drop/bench.py --row "NAME=PATH" ... --stage all -o benchmarks/lora-drop
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import skiplm
from skiplm.lora_drop import LoraDrop, kv_cache_bytes
from skiplm.measure.costs import CostModel
from skiplm.measure.perplexity import compare_perplexity, tokenize_corpus
from skiplm.measure.speed import BenchSettings, Config, run_bench
from skiplm.models.data import load_corpus
from skiplm.skipper import fixed_plan, is_healed, load_skipper

CORPORA = ("pydoc", "gsm8k")


def lora_drop_ideal(costs: CostModel, skip: LoraDrop, steps: int) -> float:
    """The ideal decode speedup of ``skip`` over ``steps`` decode steps: full compute over the mean compute kept (a
    dropped step keeps the head and the layers that are not droppable), from parameter counts."""
    dropped = sum(costs.attention[i] + costs.mlp[i] for i in skip.droppable)
    kept = [costs.total if (s + 1) % skip.anchor_every == 0 else costs.total - dropped for s in range(steps)]
    return costs.total / (sum(kept) / steps)


def rows_from(args) -> dict:
    rows = {}
    for spec in args.row:
        name, _, path = spec.rpartition("=")
        rows[name] = load_skipper(path)
    return rows


def quality(model, tokenizer, rows, tokens: int) -> dict:
    out = {}
    for corpus in CORPORA:
        ids = tokenize_corpus(tokenizer, load_corpus(corpus), tokens)
        start = time.perf_counter()
        results = compare_perplexity(model, ids, {"full": None, **rows}, context=1024, stride=512, check_model=False)
        out[corpus] = {name: r.to_json() for name, r in results.items()}
        print(f"{corpus}: " + ", ".join(f"{n} {r.perplexity:.2f}" for n, r in results.items())
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


@torch.inference_mode()
def reuse_similarity(model, tokenizer, tokens: int = 1024) -> list[dict]:
    """Why reuse works or not, measured on the full model: per layer, over ``tokens`` GSM8K tokens, the mean cosine
    between a token's residual update u_l(t) = h_out - h_in and the previous token's u_l(t-1), the relative error
    of reusing it, mean ||u_l(t) - u_l(t-1)|| / ||u_l(t)||, and the update's size against the stream,
    mean ||u_l(t)|| / ||h_in(t)||."""
    ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"), tokens)[None]
    seen = {}
    layers = skiplm.get_adapter(model).decoder_layers(model)
    hooks = [layer.register_forward_hook(lambda m, a, k, out, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"],
                                                                                         out)), with_kwargs=True)
             for i, layer in enumerate(layers)]
    try:
        model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for i in range(len(layers)):
        h_in, h_out = (t[0].float() for t in seen[i])
        u = h_out - h_in  # [tokens, d]
        cos = torch.nn.functional.cosine_similarity(u[1:], u[:-1], dim=-1)
        error = (u[1:] - u[:-1]).norm(dim=-1) / u[1:].norm(dim=-1)
        rows.append({"layer": i, "cos_prev": float(cos.mean()), "reuse_error": float(error.mean()),
                     "update_to_stream": float((u.norm(dim=-1) / h_in.norm(dim=-1)).mean())})
    return rows


@torch.inference_mode()
def kv_bytes(model, skipper, ids: torch.Tensor, steps: int, options: dict) -> int:
    handle = skiplm.apply(model, skipper, check_model=False, **options) if skipper is not None else None
    try:
        out = model(ids, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return kv_cache_bytes(cache)
    finally:
        if handle is not None:
            handle.remove()


def speed(model, tokenizer, rows, repeats: int, new_tokens: int, kv_tokens: int) -> dict:
    costs = CostModel.from_parameter_counts(model)
    configs = [Config("full", model)]
    ideals = {}
    for name, skipper in rows.items():
        options = {"merge": "restorable"} if is_healed(skipper) and skipper.step("lora") is not None else {}
        if isinstance(skipper, LoraDrop):
            ideal, prefill = lora_drop_ideal(costs, skipper, new_tokens), 1.0
        else:
            plan = fixed_plan(skipper)
            ideal, prefill = costs.ideal_speedup(plan.decode), costs.ideal_speedup(plan.prefill)
        ideals[name] = ideal
        configs.append(Config(name, model, skipper, ideal, prefill, options))
    settings = BenchSettings(batch_sizes=(1, 8), prompt_tokens=128, decode_prompt_tokens=64, new_tokens=new_tokens,
                             repeats=repeats, warmup=1)
    corpus_ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"), 16384)
    start = time.perf_counter()
    results = run_bench(configs, corpus_ids, settings,
                        progress=lambda text: None)
    print(f"speed measured in {time.perf_counter() - start:.0f} s", flush=True)
    for name, ideal in ideals.items():  # the bench's policy accounting counts MLPs only; a dropped layer skips both
        for measure, entry in results[name].items():
            if measure.startswith("decode"):
                entry["ideal_speedup"] = ideal
    prompts = corpus_ids[:64].view(1, 64)
    kv = {"full": kv_bytes(model, None, prompts, kv_tokens, {})}
    for config in configs[1:]:
        kv[config.name] = kv_bytes(model, config.plan, prompts, kv_tokens, config.options)
    return {"settings": {"batch_sizes": [1, 8], "prompt_tokens": 128, "decode_prompt_tokens": 64,
                         "new_tokens": new_tokens, "repeats": repeats, "warmup": 1,
                         "kv": f"bytes of keys and values after a 64-token prompt and {kv_tokens} greedy steps, batch 1"},
            "speed": results, "kv_bytes": kv}


def summary(out: Path, rows_order: list[str], descriptions: dict) -> None:
    q = json.loads((out / "quality.json").read_text())
    s = json.loads((out / "speed.json").read_text())
    names = ["full", *rows_order]
    table = []
    for name in names:
        entry = {"row": name, "description": descriptions.get(name, "the full model")}
        for corpus in CORPORA:
            ppl = q["perplexity"][corpus][name]["perplexity"]
            entry[f"{corpus}_ppl"] = ppl
            entry[f"{corpus}_ratio"] = ppl / q["perplexity"][corpus]["full"]["perplexity"]
        for measure in ("decode_b1", "decode_b8", "prefill_b1", "prefill_b8"):
            m = s["speed"][name][measure]
            entry[measure] = {"speedup": m["speedup"], "ci95": m["speedup_ci95"], "tokens_per_s": m["tokens_per_s"],
                              "ideal": m["ideal_speedup"]}
        entry["kv_fraction"] = s["kv_bytes"][name] / s["kv_bytes"]["full"]
        table.append(entry)
    meta = {"machine": q["machine"], "date": q["date"], "quality_settings": q["settings"], "speed_settings": s["settings"]}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")
    lines = ["| row | pydoc ppl (x full) | gsm8k ppl (x full) | decode b1 (ideal) | decode b8 | prefill b1 | "
             "KV cache (64 + 256 tokens) |", "|---|---|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['row']} | {e['pydoc_ppl']:.2f} ({e['pydoc_ratio']:.2f}x) | {e['gsm8k_ppl']:.2f} "
                     f"({e['gsm8k_ratio']:.2f}x) | {e['decode_b1']['speedup']:.2f}x ({e['decode_b1']['ideal']:.2f}x) | "
                     f"{e['decode_b8']['speedup']:.2f}x | {e['prefill_b1']['speedup']:.2f}x | {e['kv_fraction']:.0%} |")
    reuse = q.get("reuse") or []
    if reuse:
        lines += ["", "Reusing the previous token's residual update, measured on the full model (1024 GSM8K tokens):",
                  "", "| layer | cos(u(t), u(t-1)) | reuse error ‖u(t)-u(t-1)‖/‖u(t)‖ | ‖u(t)‖/‖h_in(t)‖ |",
                  "|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['cos_prev']:.2f} | {r['reuse_error']:.2f} | {r['update_to_stream']:.3f} |"
                  for r in reuse]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, measure in zip(axes, ("decode_b1", "decode_b8")):
        for e in table:
            marker = "o" if e["row"].startswith("LoRA-Drop") else ("s" if e["row"] == "full" else "^")
            ax.scatter(e[measure]["speedup"], e["gsm8k_ratio"], marker=marker, s=50)
            ax.annotate(e["row"], (e[measure]["speedup"], e["gsm8k_ratio"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel(f"measured {measure.replace('_b', ' speedup, batch ')} (paired with the full model)")
        ax.set_ylabel("GSM8K held-out perplexity / full model's")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("LoRA-Drop vs block removal on SmolLM2-135M (lower right is better)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=130)


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", action="append", default=[], help="NAME=PATH of a skipper (plan, heal, LoRA-Drop)")
    parser.add_argument("--stage", choices=("quality", "speed", "summary", "all"), default="all")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kv-tokens", type=int, default=256, help="decode steps before the KV cache is weighed")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = rows_from(args)
    descriptions = {name: skipper.describe() for name, skipper in rows.items()}
    stamp = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "rows": {name: spec.rpartition("=")[2] for name, spec in zip(rows, args.row)}}
    model = tokenizer = None
    if args.stage in ("quality", "speed", "all"):
        model, tokenizer = skiplm.load_model(args.model)
    if args.stage in ("quality", "all"):
        result = {**stamp, "settings": {"tokens": args.tokens, "context": 1024, "stride": 512, "corpora": CORPORA},
                  "perplexity": quality(model, tokenizer, rows, args.tokens),
                  "reuse": reuse_similarity(model, tokenizer)}
        (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.stage in ("speed", "all"):
        result = {**stamp, **speed(model, tokenizer, rows, args.repeats, args.new_tokens, args.kv_tokens)}
        (args.out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    if (args.out / "quality.json").is_file() and (args.out / "speed.json").is_file():
        summary(args.out, list(rows), descriptions)


if __name__ == "__main__":
    main()
