"""Generation agreement: the metrics on hand-made sequences, answer extraction, greedy decoding against a hand loop,
prompt files, and the `skiplm agree` command — on tiny seeded models."""

import json

import click
import pytest
import torch

import skiplm
from skiplm.measure.agreement import (
    FULL,
    answer_agreement,
    compare_generations,
    measure_agreement,
    summarize,
    token_agreement,
)
from skiplm.models.data import (
    Prompt,
    encode_prompts,
    extract_answer,
    load_prompts,
    normalize_number,
    read_prompt_file,
    reference_answer,
)
from skiplm.models.generation import greedy_continuations, truncate_at_eos
from skiplm.errors import DataError

from conftest import NUM_LAYERS, VOCAB, run_cli, tiny_model

PAD, EOS = 0, 2


# -- metrics on hand-made sequences -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reference,candidate,matched,prefix,positional,exact,divergence",
    [
        ([5, 6, 7, 2], [5, 6, 7, 2], 4, 1.0, 1.0, True, None),
        ([5, 6, 7], [9, 6, 7], 0, 0.0, 2 / 3, False, 0),  # diverges at position 0, agrees again after
        ([1, 2, 3, 4], [1, 9, 3, 4], 1, 1 / 4, 3 / 4, False, 1),
        ([5, 6, 2], [5, 6, 7, 8, 2], 2, 2 / 3, 2 / 5, False, 2),  # the plan does not stop where the full model does
        ([5, 6, 7, 8], [5, 2], 1, 1 / 4, 1 / 4, False, 1),  # the plan stops early
        ([5, 6, 7], [5, 6], 2, 2 / 3, 2 / 3, False, 2),  # a strict prefix is not an exact match
        ([5, 6], [5, 6, 7], 2, 1.0, 2 / 3, False, 2),  # all of the reference, but the candidate runs on
        ([], [], 0, 1.0, 1.0, True, None),
        ([], [3], 0, 0.0, 0.0, False, 0),
        ([3], [], 0, 0.0, 0.0, False, 0),
    ],
)
def test_token_agreement_on_hand_made_sequences(reference, candidate, matched, prefix, positional, exact, divergence):
    a = token_agreement(reference, candidate)
    assert a.matched_prefix == matched
    assert a.prefix_agreement == pytest.approx(prefix)
    assert a.positional_match == pytest.approx(positional)
    assert a.exact_match is exact
    assert a.first_divergence == divergence
    assert a.to_json()["exact_match"] is exact


def test_summarize_pools_over_prompts_by_hand():
    agreements = [token_agreement([1, 2, 3, 4], [1, 2, 9, 4]),  # prefix 2/4, positions 3/4
                  token_agreement([7, 8], [7, 8]),  # exact
                  token_agreement([5, 2], [6, 5, 2])]  # prefix 0/2, positions 0/3
    s = summarize(agreements)
    assert s["prompts"] == 3
    assert s["prefix_agreement"] == pytest.approx((2 / 4 + 1 + 0) / 3)
    assert s["prefix_agreement_pooled"] == pytest.approx((2 + 2 + 0) / (4 + 2 + 2))
    assert s["positional_match"] == pytest.approx((3 + 2 + 0) / (4 + 2 + 3))
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["mean_matched_prefix"] == pytest.approx(4 / 3)
    assert s["mean_candidate_length"] == pytest.approx(3)
    with pytest.raises(DataError):
        summarize([])


def test_truncate_at_eos_keeps_the_first_eos_only():
    assert truncate_at_eos([4, 5, 2, 0, 0], [2]) == [4, 5, 2]
    assert truncate_at_eos([4, 7, 2, 7], [2, 7]) == [4, 7]
    assert truncate_at_eos([4, 5, 6], [2]) == [4, 5, 6]
    assert truncate_at_eos([2, 4], [2]) == [2]


# -- answers ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,answer",
    [
        ("She makes 9 * 2 = 18 dollars.", "18"),
        ("The total is 1,234 apples", "1234"),
        ("It costs $18.00 in all.", "18"),
        ("About 0.50 of them, so 2.75 each", "2.75"),
        ("It is -5 degrees", "-5"),
        ("pages 3-5", "5"),  # a hyphen between numbers is not a minus sign
        ("5 + 7 = 12\n#### 12", "12"),
        ("12,000 and then 3", "3"),  # the last number, not the largest
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer_takes_the_last_number(text, answer):
    assert extract_answer(text) == answer


def test_reference_answer_reads_the_gsm8k_marker():
    assert reference_answer("16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = <<9*2=18>>18\n#### 18") == "18"
    assert reference_answer("... #### 1,234") == "1234"
    assert reference_answer("#### -3") == "-3"
    assert reference_answer("just 42, no marker") == "42"
    assert reference_answer("#### none") is None
    assert normalize_number("7.0") == "7" and normalize_number("1,000") == "1000" and normalize_number("x") is None


def test_answer_agreement_counts_prompts_where_the_full_model_answered():
    assert answer_agreement(["18", None, "7", "3"], ["18", None, "8", "3"]) == (pytest.approx(2 / 3), 3)
    assert answer_agreement(["5", "6"], [None, "6"]) == (1.0, 1)  # an answer where the full model has none: not counted
    assert answer_agreement([None, "1"], [None, None]) == (None, 0)
    assert answer_agreement([None], ["4"]) == (0.0, 1)


def test_gsm8k_prompts_carry_their_reference_answers():
    prompts = load_prompts("gsm8k", 3)
    assert len(prompts) == 3
    assert prompts[0].text.startswith("Janet")
    assert prompts[0].answer == "18"


# -- greedy decoding -------------------------------------------------------------------------------------------------
def _prompts(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def _hand_greedy(model, prompt, new_tokens, eos):
    """Greedy by full recomputation, one prompt at a time: no cache, no padding."""
    ids, out = list(prompt), []
    for _ in range(new_tokens):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token in eos:
            break
    return out


def _hand_agreement(reference, candidate):
    matched = 0
    while matched < min(len(reference), len(candidate)) and reference[matched] == candidate[matched]:
        matched += 1
    return matched / len(reference)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_batched_cached_greedy_equals_unbatched_recomputation(family):
    model = tiny_model(family)
    # a checkpoint's sampling / penalty settings must not leak into "plain greedy"
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 2
    prompts = _prompts([5, 11, 3, 7, 9])
    plan = skiplm.SkipPlan.from_layers(NUM_LAYERS, blocks=[1], attention=[3])
    for applied in (None, plan):
        handle = skiplm.apply(model, applied) if applied else None
        try:
            got = greedy_continuations(model, prompts, new_tokens=10, eos_ids=[EOS], pad_token_id=PAD, batch_size=3)
            want = [_hand_greedy(model, p, 10, [EOS]) for p in prompts]
        finally:
            if handle:
                handle.remove()
        assert got == want


def test_each_row_stops_at_its_own_eos():
    model = tiny_model("llama")
    prompts = _prompts([4, 9, 6, 8], seed=7)
    free = greedy_continuations(model, prompts, new_tokens=12, eos_ids=[VOCAB + 1], pad_token_id=PAD, batch_size=4)
    assert all(len(row) == 12 for row in free)
    stop = free[1][3]  # a token the second row emits at position 3: call it the end of sequence
    stopped = greedy_continuations(model, prompts, new_tokens=12, eos_ids=[stop], pad_token_id=PAD, batch_size=4)
    assert stopped == [truncate_at_eos(row, [stop]) for row in free]
    assert len(stopped[1]) <= 4 and stopped[1][-1] == stop
    assert any(len(row) == 12 for row in stopped)  # rows that never emit it run to the limit, undisturbed


def test_no_plan_and_empty_plan_agree_completely():
    model = tiny_model("llama")
    prompts = _prompts([6, 3, 8])
    outputs, seconds = compare_generations(model, prompts, {"again": None, "empty": skiplm.SkipPlan.empty(NUM_LAYERS)},
                                           new_tokens=8, eos_ids=[EOS], pad_token_id=PAD, batch_size=2)
    assert set(outputs) == {FULL, "again", "empty"} and set(seconds) == set(outputs)
    for name in ("again", "empty"):
        assert outputs[name] == outputs[FULL]
        s = summarize([token_agreement(r, c) for r, c in zip(outputs[FULL], outputs[name])])
        assert s["prefix_agreement"] == s["positional_match"] == s["exact_match"] == 1.0


def test_a_differing_plan_gets_exactly_the_hand_computed_agreement():
    model = tiny_model("llama")
    prompts = _prompts([6, 3, 8, 5], seed=11)
    plan = skiplm.SkipPlan.from_layers(NUM_LAYERS, blocks=[1, 3]).for_model(model)
    outputs, _ = compare_generations(model, prompts, {"plan": plan}, new_tokens=8, eos_ids=[EOS], pad_token_id=PAD,
                                     batch_size=4)
    reference = [_hand_greedy(model, p, 8, [EOS]) for p in prompts]
    with skiplm.apply(model, plan):
        candidate = [_hand_greedy(model, p, 8, [EOS]) for p in prompts]
    assert outputs[FULL] == reference and outputs["plan"] == candidate
    assert reference != candidate  # the plan changes the output, so the metrics below are not trivially 1
    agreements = [token_agreement(r, c) for r, c in zip(reference, candidate)]
    expected = [_hand_agreement(r, c) for r, c in zip(reference, candidate)]
    assert [a.prefix_agreement for a in agreements] == pytest.approx(expected)
    assert summarize(agreements)["prefix_agreement"] == pytest.approx(sum(expected) / len(expected))
    matches = sum(r[i] == c[i] for r, c in zip(reference, candidate) for i in range(min(len(r), len(c))))
    assert summarize(agreements)["positional_match"] == pytest.approx(
        matches / sum(max(len(r), len(c)) for r, c in zip(reference, candidate)))


def test_measure_agreement_on_text_with_answers(tiny_folder):
    model, tokenizer = skiplm.load_model(str(tiny_folder))
    prompts = [Prompt("What is 2 + 2?", "#### 4"), Prompt("Name a colour."), Prompt("Count to three.", "3")]
    plan = skiplm.SkipPlan.from_layers(4, blocks=[0, 2]).for_model(model)
    result = measure_agreement(model, tokenizer, prompts, {"empty": skiplm.SkipPlan.empty(4), "plan": plan},
                               new_tokens=6, batch_size=2, source="test")
    assert result["settings"]["chat_template"] is True and result["settings"]["count"] == 3
    empty, full = result["summary"]["empty"], result["summary"][FULL]
    assert empty["prefix_agreement"] == empty["exact_match"] == empty["positional_match"] == 1.0
    assert empty["answer_agreement"] in (None, 1.0)
    assert full["graded_prompts"] == 2 and result["summary"]["plan"]["graded_prompts"] == 2
    records = result["per_prompt"]
    assert [r.get("reference_answer") for r in records] == ["4", None, "3"]
    for name in (FULL, "empty", "plan"):
        correct = [r[name]["correct"] for r in records if "correct" in r[name]]
        assert result["summary"][name]["accuracy"] == pytest.approx(sum(correct) / 2)
        for r in records:
            assert r[name]["text"] == tokenizer.decode(r[name]["tokens"], skip_special_tokens=True)
            assert 1 <= len(r[name]["tokens"]) <= 6
    plan_records = [r["plan"] for r in records]
    assert result["summary"]["plan"]["exact_match"] == pytest.approx(sum(o["exact_match"] for o in plan_records) / 3)
    # the chat template is applied: the prompt tokens include the template's turn markers
    raw = encode_prompts(tokenizer, prompts[:1], chat=False)[0]
    assert records[0]["prompt_tokens"] > len(raw)


# -- prompt files and errors -----------------------------------------------------------------------------------------
def test_prompt_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("First prompt\n\n  Second prompt  \n")
    assert [p.text for p in read_prompt_file(plain)] == ["First prompt", "Second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "Add 2 and 3.", "answer": 5}\n\n{"prompt": "Hi", "extra": 1}\n')
    prompts = read_prompt_file(jsonl)
    assert [(p.text, p.answer) for p in prompts] == [("Add 2 and 3.", "5"), ("Hi", None)]
    detected = tmp_path / "p.txt2"  # JSON Lines recognised by content too
    detected.write_text('{"prompt": "x"}\n')
    assert read_prompt_file(detected)[0].text == "x"
    assert len(load_prompts(str(plain), limit=1)) == 1


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", "", "is empty"),
        ("blank.txt", "\n   \n\n", "is empty"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n', "line 2 is not valid JSON"),
        ("noprompt.jsonl", '{"question": "q"}\n', 'no "prompt" field'),
        ("list.jsonl", '["a"]\n', 'no "prompt" field'),
        ("emptyprompt.jsonl", '{"prompt": "  "}\n', "non-empty string"),
        ("numprompt.jsonl", '{"prompt": 3}\n', "non-empty string"),
        ("badanswer.jsonl", '{"prompt": "q", "answer": [1]}\n', '"answer" must be'),
    ],
)
def test_bad_prompt_files_get_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompt_file(path)


def test_other_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="at least 1"):
        load_prompts("gsm8k", 0)
    model = tiny_model("llama")
    with pytest.raises(DataError, match="new_tokens"):
        greedy_continuations(model, [[3, 4]], new_tokens=0, eos_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(DataError, match="no tokens"):
        greedy_continuations(model, [[3, 4], []], new_tokens=2, eos_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(DataError, match="no prompts"):
        compare_generations(model, [], {}, new_tokens=2, eos_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(DataError, match="full model"):
        compare_generations(model, [[3]], {FULL: None}, new_tokens=2, eos_ids=[EOS], pad_token_id=PAD)


# -- the command ------------------------------------------------------------------------------------------------------
def test_cli_agree_writes_json_and_markdown(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 3 + 4?", "answer": "#### 7"}\n{"prompt": "Say hello."}\n'
                       '{"prompt": "Write a number."}\n')
    plan_file = tmp_path / "skip1.json"
    assert run_cli("plan", tiny_folder, "--skip", 1, "-o", plan_file).exception is None
    empty_file = skiplm.SkipPlan.empty(4).save(tmp_path / "empty.json")
    out = tmp_path / "agree"
    result = run_cli("agree", tiny_folder, "--plan", plan_file, "--plan", empty_file, "--prompts", prompts,
                     "--limit", 2, "--new-tokens", 5, "--batch-size", 2, "-o", out)
    assert result.exception is None, result.output
    data = json.loads((out / "agreement.json").read_text())
    assert data["kind"] == "generation-agreement" and data["model"] == str(tiny_folder)
    assert data["settings"]["count"] == 2 and data["settings"]["prompts"] == "prompts.jsonl"
    assert set(data["summary"]) == {FULL, "skip1", "empty"}
    assert data["summary"]["empty"]["exact_match"] == 1.0
    assert data["plans"]["skip1"]["decode"]["blocks"] and data["plans"]["empty"]["decode"]["blocks"] == []
    assert "machine" in data and len(data["per_prompt"]) == 2
    markdown = (out / "agreement.md").read_text()
    assert "| skip1 |" in markdown and "## Per prompt" in markdown and "accuracy" in markdown
    # without a plan: the full model alone (its answers and accuracy)
    result = run_cli("agree", tiny_folder, "--prompts", prompts, "--new-tokens", 3, "-o", tmp_path / "alone")
    assert result.exception is None, result.output
    data = json.loads((tmp_path / "alone" / "agreement.json").read_text())
    assert list(data["summary"]) == [FULL] and data["settings"]["count"] == 3 and data["summary"][FULL]["graded_prompts"] == 1


def test_cli_agree_explains_bad_input(tiny_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = run_cli("agree", tiny_folder, "--prompts", empty, "-o", tmp_path / "a")
    assert isinstance(result.exception, DataError) and "is empty" in str(result.exception)
    result = run_cli("agree", tiny_folder, "--prompts", tmp_path / "nope.txt", "-o", tmp_path / "a")
    assert isinstance(result.exception, DataError) and "does not exist" in str(result.exception)
    result = run_cli("agree", tiny_folder, "--new-tokens", 0, "-o", tmp_path / "a")
    assert isinstance(result.exception, click.BadParameter) and "--new-tokens" in result.exception.format_message()
