"""Which layers the trained FiRST routers skip, per prompt: 8 GSM8K chat prompts, 8 pydoc chunks, 4 random-token
prompts, a French and a code prompt (the routers' decisions at prefill; results in README.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/first/routes.py [results/first-work]
"""

from __future__ import annotations

import collections
import sys
import warnings

import torch

import skiplm
from skiplm.models import DEFAULT_MODEL, load_model
from skiplm.speculative.bench import prompt_set


def main(work: str) -> None:
    warnings.simplefilter("ignore")
    model, tok = load_model(DEFAULT_MODEL)
    generator = torch.Generator().manual_seed(0)
    prompts = {**{f"gsm8k {i}": p for i, p in enumerate(prompt_set(tok, "gsm8k", 8))},
               **{f"pydoc {i}": p for i, p in enumerate(prompt_set(tok, "pydoc", 8))},
               **{f"random {i}": torch.randint(100, 40000, (64,), generator=generator).tolist() for i in range(4)},
               "french": tok("Bonjour, je voudrais savoir comment")["input_ids"],
               "code": tok("def fibonacci(n):\n    if n < 2:")["input_ids"]}
    for target in ("1.1", "1.2", "1.3"):
        first = skiplm.load_skipper(f"{work}/first-{target}")
        chosen = collections.defaultdict(list)
        with skiplm.apply(model, first) as handle, torch.inference_mode():
            for name, ids in prompts.items():
                model(torch.tensor([ids]))
                chosen[tuple(handle.skipped_layers()[0])].append(name)
        print(f"{target}x: {len(chosen)} skip set(s)")
        for layers, names in chosen.items():
            print(f"  layers {list(layers)}: {len(names)} prompts ({', '.join(names)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/first-work")
