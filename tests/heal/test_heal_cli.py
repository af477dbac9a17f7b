"""A heal folder wherever a plan goes: ``load_skipper``, ``--heal`` on generate, eval, bench, agree and compare (each
healed row's numbers equal the ones computed in Python under ``skiplm.apply(model, load_healed(folder))``), the
lm-eval model type's ``heal=``, and the refusals. (``bench --sweep --heal``: tests/sweep; ``export --heal``:
tests/export; bad input: tests/cli/test_bad_input.py.)"""

from __future__ import annotations

import json

import pytest
import torch

import skiplm
from skiplm import PlanMismatchError
from skiplm.heal import HEAL_FILE, HealError, Healed, load_healed
from skiplm.measure.costs import CostModel
from skiplm.measure.perplexity import perplexity, tokenize_corpus
from skiplm.models.data import load_corpus
from skiplm.skipper import is_healed

from conftest import heal_folder, run_cli

HEALED = "b1 (healed)"  # the row of the tiny_heal folder (named b1)


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    """The tiny model as the commands load it, and its tokenizer."""
    from skiplm.models.loading import load_model

    return load_model(str(tiny_folder))


@pytest.fixture(scope="module")
def healed(tiny_heal):
    return load_healed(tiny_heal.folder)


def ppl(loaded, skipper, corpus, tokens, context, stride):
    """Perplexity in Python: the full model (None) or under ``skipper``, as eval, compare and a sweep score it."""
    model, tokenizer = loaded
    ids = tokenize_corpus(tokenizer, load_corpus(corpus), tokens)
    if skipper is None:
        return perplexity(model, ids, context=context, stride=stride).perplexity
    with skiplm.apply(model, skipper.teacher_forced()):
        return perplexity(model, ids, context=context, stride=stride).perplexity


def ok(result):
    assert result.exception is None, (result.output, result.exception)
    return result


# -- load_skipper -------------------------------------------------------------------------------------------------
def test_load_skipper_reads_a_heal_folder_or_its_record(tiny_heal, healed, tmp_path):
    for path in (tiny_heal.folder, tiny_heal.folder / HEAL_FILE, str(tiny_heal.folder)):
        skipper = skiplm.load_skipper(path)
        assert isinstance(skipper, Healed) and is_healed(skipper) and skipper.plan == healed.plan
        assert all(torch.equal(skipper.maps[k], healed.maps[k]) for k in healed.maps)
    assert not is_healed(skiplm.load_skipper(tiny_heal.plan_file))
    with pytest.raises(HealError, match="is not a heal folder"):
        skiplm.load_skipper(tmp_path)


# -- the commands, each healed row against Python --------------------------------------------------------------------
def test_eval_heal_row_beside_its_plan(tiny_folder, tiny_heal, loaded, healed, tmp_path):
    model, _ = loaded
    ok(run_cli("eval", tiny_folder, "--plan", tiny_heal.plan_file, "--heal", tiny_heal.folder, "--corpus", "gsm8k",
               "--tokens", 64, "--context", 32, "--stride", 16, "-o", tmp_path))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert list(result["plans"]) == ["full", "b1", HEALED]
    assert result["plans"][HEALED]["format"] == "skiplm.heal"
    scores = {name: row["perplexity"] for name, row in result["perplexity"]["gsm8k"].items()}
    assert scores[HEALED] == pytest.approx(ppl(loaded, healed, "gsm8k", 64, 32, 16), rel=1e-5)
    assert scores["b1"] == pytest.approx(ppl(loaded, healed.plan, "gsm8k", 64, 32, 16), rel=1e-5)
    assert scores[HEALED] != pytest.approx(scores["b1"], rel=1e-4)  # the heal changed something
    assert HEALED in (tmp_path / "eval.md").read_text()


def test_bench_heal_row(tiny_folder, tiny_heal, loaded, healed, tmp_path):
    model, _ = loaded
    ok(run_cli("bench", tiny_folder, "--plan", tiny_heal.plan_file, "--heal", tiny_heal.folder, "--batch-sizes", 1,
               "--prompt-tokens", 8, "--decode-prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1, "--warmup", 0,
               "-o", tmp_path))
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["speed"]) == {"full", "b1", "b1 (layers deleted)", HEALED}  # no pruned copy of a healed plan
    assert result["plans"][HEALED]["format"] == "skiplm.heal"
    assert result["plans"][HEALED]["plan"] == healed.plan.to_json()
    ideal = CostModel.from_parameter_counts(model).ideal_speedup(healed.plan.decode)
    assert result["speed"][HEALED]["decode_b1"]["ideal_speedup"] == pytest.approx(ideal)
    assert result["speed"][HEALED]["decode_b1"]["tokens_per_s"] > 0


def test_agree_heal_row(tiny_folder, tiny_heal, loaded, healed, tmp_path):
    from skiplm.measure.agreement import measure_agreement
    from skiplm.models.data import load_prompts

    model, tokenizer = loaded
    ok(run_cli("agree", tiny_folder, "--heal", tiny_heal.folder, "--limit", 2, "--new-tokens", 6, "--batch-size", 2,
               "-o", tmp_path))
    result = json.loads((tmp_path / "agreement.json").read_text())
    expected = measure_agreement(model, tokenizer, load_prompts("gsm8k", 2), {HEALED: healed}, new_tokens=6,
                                 batch_size=2)
    assert [p[HEALED]["tokens"] for p in result["per_prompt"]] == [p[HEALED]["tokens"] for p in expected["per_prompt"]]
    assert result["summary"][HEALED]["prefix_agreement"] == expected["summary"][HEALED]["prefix_agreement"]


def _greedy_text(model, tokenizer, skipper, prompt, new_tokens):
    inputs = tokenizer(prompt, return_tensors="pt")
    with skiplm.apply(model, skipper):
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("merge", [False, True])
def test_generate_with_heal(tiny_folder, tiny_heal, loaded, healed, merge):
    model, tokenizer = loaded
    result = ok(run_cli("generate", tiny_folder, "--heal", tiny_heal.folder, "--raw", "--prompt", "Hello there",
                        "--max-new-tokens", 8, *(["--merge"] if merge else [])))
    expected = _greedy_text(model, tokenizer, healed, "Hello there", 8)
    assert expected.strip() and expected.strip() in result.output
    assert "healed (bridge" in result.output


def test_compare_heal_point_and_plot(tiny_folder, tiny_heal, loaded, healed, tmp_path):
    model, _ = loaded
    ok(run_cli("compare", tiny_folder, "--methods", "uniform", "--targets", "1.005", "--heal", tiny_heal.folder,
               "--tokens", 64, "--context", 32, "--stride", 16, "--sequences", 1, "--length", 16, "--repeats", 1,
               "--new-tokens", 2, "-o", tmp_path))
    result = json.loads((tmp_path / "compare.json").read_text())
    row = next(r for r in result["points"] if r["method"] == HEALED)
    assert row["healed"] is True and not any(r.get("healed") for r in result["points"] if r is not row)
    assert row["perplexity"] == pytest.approx(ppl(loaded, healed, "pydoc", 64, 32, 16), rel=1e-5)
    # a plan with no target speedup of its own sits at its ideal speedup
    assert row["target"] == pytest.approx(CostModel.from_parameter_counts(model).ideal_speedup(healed.plan.decode))
    assert HEALED in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 0


# -- lm-eval's model type -----------------------------------------------------------------------------------------
def test_lm_eval_model_type_takes_a_heal_folder(tiny_folder, tiny_heal, loaded, healed):
    pytest.importorskip("lm_eval")
    from skiplm.integrations.lm_eval import SkipLM

    model, _ = loaded
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), skiplm.apply(model, healed):
        expected = model(ids).logits
    for merge in (False, True):
        lm = SkipLM(pretrained=str(tiny_folder), heal=str(tiny_heal.folder), merge=merge, batch_size=1)
        try:
            assert is_healed(lm.skip_plan)
            with torch.inference_mode():
                torch.testing.assert_close(lm.model(ids).logits, expected)
        finally:
            lm.remove_plan()
    with pytest.raises(skiplm.PlanError, match="not both"):
        SkipLM(pretrained=str(tiny_folder), plan=str(tiny_heal.plan_file), heal=str(tiny_heal.folder))
    with pytest.raises(skiplm.PlanError, match="give heal=DIR"):
        SkipLM(pretrained=str(tiny_folder), plan=str(tiny_heal.plan_file), merge=True)


# -- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ("generate", "--prompt", "Hi"),
    ("export", "-o", "{tmp}/out"),
])
def test_heal_and_plan_do_not_combine(tiny_folder, tiny_heal, tmp_path, command):
    name, *rest = command
    rest = [str(a).replace("{tmp}", str(tmp_path)) for a in rest]
    result = run_cli(name, tiny_folder, *rest, "--plan", tiny_heal.plan_file, "--heal", tiny_heal.folder)
    assert "--heal and --plan do not combine" in str(result.exception)


def test_a_heal_folder_for_other_weights_needs_force(tiny_folder, tmp_path):
    from skiplm.models.loading import load_model

    other, _ = load_model(str(tiny_folder))
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(1.0)
    folder = heal_folder(other, tmp_path / "other", name="other-weights")
    eval_args = ("eval", tiny_folder, "--tokens", 16, "--context", 8, "--stride", 4, "--heal", folder)
    result = run_cli(*eval_args, "-o", tmp_path / "eval")
    assert isinstance(result.exception, PlanMismatchError) and "heal folder" in str(result.exception)
    ok(run_cli(*eval_args, "--force", "-o", tmp_path / "eval"))
    assert "other (healed)" in json.loads((tmp_path / "eval" / "eval.json").read_text())["plans"]
