"""Make the skip-set draft plans and train their adapters, with the default model loaded once (one job under the CPU
lock): the K blocks of lowest Block Influence on 2 x 256 GSM8K tokens (the skip sets `skiplm draft-search` tries),
drafting from an int8-dynamic copy, each with a LoRA adapter (`skiplm draft-train`'s defaults: rank 16 on every
linear layer of the kept layers, learning rate 5e-4, batch 4) distilled toward the full model on 128 x 256 tokens the
model wrote itself (cached; the last 8 sequences held out), for at most MINUTES minutes each.

    python benchmarks/trained-draft/train.py DRAFTS_FOLDER MINUTES K [K ...]

Writes DRAFTS_FOLDER/skipK-int8-dynamic.json (untrained), skipK-lora.json and skipK-lora.adapter/ (trained), and
copies each adapter's record (draft-adapter.json: its training, evaluations included) beside this script.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path


def main(drafts: Path, minutes: float, blocks: list[int]) -> None:
    from skiplm.models.loading import load_model
    from skiplm.planners import get_planner, load_calibration
    from skiplm.speculative.trained import adapter_folder, draft_training_data, save_trained_draft, train_draft
    from skiplm.train.distill import TrainSettings

    here = Path(__file__).parent
    drafts.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
    calibration = load_calibration(tokenizer, "gsm8k", 2, 256)
    ranked = get_planner("block-influence")(model, skip=max(blocks), calibration=calibration, name="smollm2-135m")
    order = ranked.provenance["order"]
    data = draft_training_data(model, tokenizer, sequences=128, length=256)
    print(f"data: {len(data)} sequences ({'cached' if not data.generated else 'generated'})", flush=True)
    for k in blocks:
        from skiplm import SkipPlan

        plan = SkipPlan.from_layers(model.config.num_hidden_layers, blocks=order[:k], model=ranked.model,
                                    provenance={**ranked.provenance, "order": order[:k], "target": {"skip": k},
                                                "draft": {"precision": "int8-dynamic"}})
        plan.save(drafts / f"skip{k}-int8-dynamic.json")
        settings = TrainSettings(steps=400, minutes=minutes, batch_size=4, learning_rate=5e-4, warmup_steps=10,
                                 eval_every=40, patience=3)
        run = drafts / f"run-skip{k}"
        shutil.rmtree(run, ignore_errors=True)
        last = [0.0]

        def progress(step, total, info, last=last):
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                print(f"  step {step}: loss {info['loss']:.4f}, {info['tokens_per_second']:.0f} tok/s"
                      + (f", held-out acceptance {info['held_out_acceptance']:.3f}" if "held_out_acceptance" in info
                         else ""), flush=True)

        adapter = train_draft(model, plan, data, precision="int8-dynamic", settings=settings, run_dir=run,
                              progress=progress)
        trained = dataclasses.replace(plan, provenance={**plan.provenance, "draft_train": {
            "command": "benchmarks/trained-draft/train.py"}})
        path = save_trained_draft(trained, adapter, drafts / f"skip{k}-lora.json")
        shutil.copy(adapter_folder(path) / "draft-adapter.json", here / f"skip{k}-lora.draft-adapter.json")
        record = adapter.record["training"]
        first, best = record["evaluations"][0], record["held_out"]
        print(f"skip {k} blocks {order[:k]}: {record['steps']} steps in {record['seconds']:.0f} s "
              f"({record['stopped']}); held-out KL {first['kl']:.4f} -> {best['kl']:.4f}, acceptance proxy "
              f"{first['acceptance']:.3f} -> {best['acceptance']:.3f}, top-1 agreement {first['agreement']:.3f} -> "
              f"{best['agreement']:.3f}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), [int(k) for k in sys.argv[3:]])
