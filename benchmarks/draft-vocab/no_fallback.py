"""The same drafts as run.sh's bench-speculative, with the speed monitor off (fallback=False: every draft speculates
the whole generation), so that the comparison between vocabulary sizes is the drafts' own, not the monitor's (in the
paired run the monitor fell back to plain steps for some drafts and not others). 4 prompts per set, batch 1, 128 new
tokens, 2 alternating rounds; writes no-fallback.json / no-fallback.md.

    flock /tmp/skiplm-cpu.lock .venv/bin/python benchmarks/draft-vocab/no_fallback.py SIZE[,SIZE...] OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from skiplm.models.loading import load_model
from skiplm.report.files import machine_info, write_json
from skiplm.speculative.bench import bench_drafts, prompt_set, run_speculative_bench, table_rows
from skiplm.report.files import markdown_table
from skiplm.speculative.vocab import draft_vocabulary


def main(sizes_arg: str, out: str) -> None:
    torch.set_num_threads(2)
    out = Path(out)
    model, tokenizer = load_model("smollm2-135m")
    rows = model.get_output_embeddings().weight.shape[0]
    vocabs = [draft_vocabulary(tokenizer, int(n), vocab_size=rows) for n in sizes_arg.split(",")]
    drafts = bench_drafts({}, ["int8-dynamic"], vocabs=vocabs)
    prompts = {name: prompt_set(tokenizer, name, 4) for name in ("gsm8k", "pydoc")}
    result = run_speculative_bench(model, prompts, drafts, batch_sizes=(1,), new_tokens=128, repeats=2,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                                   fallback=False)
    settings = {"repeats": 2, "limit": 4, "new_tokens": 128, "fallback": False, "machine": machine_info("cpu"),
                "command": " ".join(sys.argv)}
    write_json(out / "no-fallback.json", {"kind": "speculative-bench", "settings": settings, **result})
    headers, table = table_rows(result, settings)
    (out / "no-fallback.md").write_text(
        "# Reduced-vocabulary drafts with the speed monitor off (fallback=False), batch 1\n\n"
        f"{settings['machine']['cpu']}, 2 threads; 4 prompts per set, 128 new tokens, 2 alternating rounds.\n\n"
        + markdown_table(headers, table) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
