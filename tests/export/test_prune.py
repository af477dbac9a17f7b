"""Physical pruning: a copy with the skipped blocks deleted computes what the planned model does."""


import pytest
import torch

import skiplm
from skiplm.export.prune import prune_blocks

from conftest import tiny_model



@pytest.mark.parametrize("family", ["llama", "gemma3_text", "olmo2"])


def test_pruned_copy_equals_planned_model(family):
    model = tiny_model(family)
    plan = skiplm.SkipPlan.from_layers(5, blocks=[1, 3]).for_model(model)
    pruned = prune_blocks(model, plan.decode.blocks)
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with skiplm.apply(model, plan):
            planned = model(ids).logits
            planned_generation = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert pruned.config.num_hidden_layers == 3
        assert torch.allclose(pruned(ids).logits, planned, atol=1e-5)
        assert torch.equal(pruned.generate(ids, max_new_tokens=6, do_sample=False), planned_generation)
    shared = prune_blocks(model, [1], share_weights=True)
    assert shared.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert len(model.model.layers) == 5  # the original is untouched
