"""Input-adaptive policies (ffn-skip, lac): exactness when nothing is skipped, per-token execution against static
plans, the KV cache against full recomputation, calibration, files and maps."""

from __future__ import annotations

import json

import pytest
import torch

import skiplm
from skiplm.errors import PlanError, PlanMismatchError
from skiplm.policies import (
    FFNSkip,
    HaltingPolicy,
    LAC,
    activation_summary,
    apply_policy,
    best_last_check,
    calibrate,
    make_policy,
    measure_skip_ratio,
    plot_activation_maps,
    skip_ratio_for_speedup,
)

from skiplm import load_skipper
from conftest import FAMILIES, VOCAB, FixedMasks, cached_tiny_model, greedy_with_cache, plan_for, replay

LAYERS = 8  # deeper than the default tiny model, so there is room between the protected layers


def deep_model(family: str):
    return cached_tiny_model(family, num_layers=LAYERS)


def batch_ids(rows: int = 2, length: int = 14, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def skipping(method: str, **settings) -> HaltingPolicy:
    """A policy that skips a fair share of sublayers on the tiny models (thresholds found by hand)."""
    threshold = {"ffn-skip": 0.3, "lac": 0.3}[method]
    defaults = dict(protect_first=2, protect_last=1, warmup=2)
    return make_policy(method, LAYERS, threshold, **{**defaults, **settings})


def never_skipping(method: str) -> HaltingPolicy:
    return make_policy(method, LAYERS, 1.5 if method == "ffn-skip" else 0.0, protect_first=2, protect_last=1)


# -- the oracle: nothing skipped is the full model ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ffn-skip", "lac"])
def test_policy_that_never_skips_is_the_full_model(family, method):
    model, ids = deep_model(family), batch_ids()
    reference = model(ids).logits
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    with apply_policy(model, never_skipping(method), check_model=False) as handle:
        assert torch.equal(model(ids).logits, reference)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
    assert handle.stats.mlp_skip_ratio("prefill") == 0.0
    assert handle.stats.mlp_skip_ratio("decode") == 0.0


@pytest.mark.parametrize("method", ["ffn-skip", "lac"])
def test_dry_run_decides_but_computes_the_full_model(method):
    model, ids = deep_model("llama"), batch_ids()
    reference = model(ids).logits
    with apply_policy(model, skipping(method), check_model=False, dry_run=True) as handle:
        assert torch.equal(model(ids).logits, reference)
    assert handle.stats.mlp_skip_ratio("prefill") > 0.1  # it would have skipped these


def test_skipping_policies_change_the_output():
    model, ids = deep_model("llama"), batch_ids()
    reference = model(ids).logits
    for method in ("ffn-skip", "lac"):
        with apply_policy(model, skipping(method), check_model=False) as handle:
            logits = model(ids).logits
        assert handle.stats.mlp_skip_ratio("prefill") > 0.1
        assert not torch.allclose(logits, reference, atol=1e-3)


# -- per-token execution against static plans ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("part", ["mlp", "attention"])
def test_per_token_skips_match_static_plans_row_by_row(family, part):
    """Row 0 skips ``part`` of layers 2 and 4 for every token, row 1 runs everything: row 0 must equal the static
    plan on that row alone, row 1 the full model (the gather / scatter path with a mixed mask)."""
    model, ids = deep_model(family), batch_ids()
    mask = torch.tensor([[False] * ids.shape[1], [True] * ids.shape[1]])
    policy = FixedMasks(LAYERS, {"prefill": 0.0}, protect_first=1, protect_last=1,
                        masks={part: {2: mask, 4: mask}}, attention=part == "attention")
    with apply_policy(model, policy, check_model=False) as handle:
        logits = model(ids).logits
    plan = skiplm.SkipPlan.from_layers(LAYERS, **{part: [2, 4]})
    with skiplm.apply(model, plan, check_model=False):
        planned_row = model(ids[:1]).logits
    full_row = model(ids[1:]).logits
    torch.testing.assert_close(logits[:1], planned_row, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:], full_row, atol=1e-5, rtol=1e-5)
    stats = handle.stats
    skipped = 2 * ids.shape[1]  # two layers, one row
    if part == "mlp":
        assert stats.mlp_total["prefill"] - stats.mlp_run["prefill"] == skipped
    else:
        assert stats.attention_total["prefill"] - stats.attention_run["prefill"] == skipped


# -- the KV cache: cached decoding == recomputation with the same decisions ---------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,parts", [("ffn-skip", None), ("lac", "layer"), ("lac", "mlp")])
def test_cached_decoding_equals_recomputation(family, method, parts):
    """Decode with the KV cache under a policy that skips per token (for lac "layer", attention contributions too),
    record every decision, then recompute the whole sequence without a cache applying the same decisions: the
    logits of every generated position agree. A token that skipped attention wrote its keys and values."""
    model, ids = deep_model(family), batch_ids(rows=1, length=10)
    settings = {"parts": parts} if parts else {}
    policy = skipping(method, **settings)
    with apply_policy(model, policy, check_model=False, record=True) as handle:
        sequence, cached = greedy_with_cache(model, ids, 8)
    decode = handle.stats.to_json()["decode"]
    assert decode["mlp_skip_ratio"] > 0, "the test needs decode steps that skip"
    if parts == "layer":
        assert decode["attention_skip_ratio"] > 0
    with apply_policy(model, replay(policy, handle.maps, LAYERS), check_model=False):
        recomputed = model(sequence).logits[0, ids.shape[1] - 1:]
    torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=1e-4)


def test_batched_generation_with_a_policy_runs_and_counts_every_row():
    model, ids = deep_model("qwen2"), batch_ids(rows=3)
    with apply_policy(model, skipping("ffn-skip"), check_model=False) as handle:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (3, ids.shape[1] + 5)
    assert handle.stats.tokens["decode"] == 3 * 4


# -- the decision rules, on hand-made residual streams -------------------------------------------------------------------
def test_ffn_skip_halts_after_window_saturated_layers_and_not_before():
    policy = FFNSkip(10, {"prefill": 0.9, "decode": 0.9}, protect_first=2, protect_last=2, warmup=0, window=2)
    policy.begin("prefill", 1, 2, 0, torch.device("cpu"))
    x = torch.ones(1, 2, 4)
    moved = torch.tensor([[[1.0, 1, 1, 1], [1, -1, 1, -1]]])  # token 0: cos 1 (saturated); token 1: cos 0
    for layer in range(2):
        policy.observe(layer, x, x, moved)
    assert policy.run_mask(1, "mlp") is None  # layer 1 is protected
    assert policy.run_mask(2, "mlp").tolist() == [[False, True]]  # token 0 saturated twice: skips; token 1 runs
    assert policy.run_mask(2, "attention") is None  # ffn-skip never skips attention
    assert policy.run_mask(8, "mlp") is None  # the last two layers are protected


def test_ffn_skip_warmup_tokens_never_halt():
    policy = FFNSkip(10, {"prefill": 0.5, "decode": 0.5}, protect_first=2, protect_last=2, warmup=3, window=1)
    policy.begin("prefill", 1, 5, 0, torch.device("cpu"))
    x = torch.ones(1, 5, 4)
    policy.observe(0, x, x, x)
    policy.observe(1, x, x, x)
    assert policy.run_mask(2, "mlp").tolist() == [[True, True, True, False, False]]


def test_lac_halts_when_the_norm_change_falls_under_alpha_of_the_range():
    policy = LAC(10, {"prefill": 0.5, "decode": 0.5}, protect_first=3, protect_last=1, warmup=0)
    policy.begin("prefill", 1, 2, 0, torch.device("cpu"))
    norms = [[1.0, 1.0], [11.0, 11.0], [12.0, 12.0], [13.0, 20.0]]  # changes: 10, 1, then 1 (token 0) / 8 (token 1)
    states = [torch.tensor(n).view(1, 2, 1) * torch.tensor([1.0, 0, 0, 0]) for n in norms]
    for layer in range(3):
        policy.observe(layer, states[layer], None, states[layer + 1])
    # earlier range: 10 - 1 = 9; alpha 0.5 -> 4.5. Token 0 changed by 1 (< 4.5): halts. Token 1 by 8: runs.
    assert policy.run_mask(3, "mlp").tolist() == [[False, True]]
    assert policy.run_mask(3, "attention").tolist() == [[False, True]]
    assert LAC(10, {"decode": 0.5}, parts="mlp").skips_attention is False


def test_halting_is_for_good_on_both_paths():
    """A token that settled stays halted even if a later layer's signal says otherwise — for one token (Python
    numbers, the batch-1 decode path) exactly as for many (tensors)."""
    x = torch.ones(1, 1, 4)
    turned = torch.tensor([[[1.0, -1, 1, -1]]])  # cos(x, turned) = 0
    for batch, tokens in ((1, 1), (1, 2)):
        policy = FFNSkip(10, {"prefill": 0.9, "decode": 0.9}, protect_first=3, protect_last=1, warmup=0, window=1)
        policy.begin("decode", batch, tokens, 10, torch.device("cpu"))
        shape = (batch, tokens, 4)
        policy.observe(0, x.expand(shape), x.expand(shape), x.expand(shape))  # saturated: settles at layer 0
        policy.observe(1, x.expand(shape), x.expand(shape), turned.expand(shape))  # not saturated at layer 1
        policy.observe(2, x.expand(shape), x.expand(shape), turned.expand(shape))
        mask = policy.run_mask(3, "mlp")
        assert mask is False or (torch.is_tensor(mask) and not mask.any()), (batch, tokens, mask)


def test_one_token_decisions_equal_batched_decisions():
    """Batch-1 decode keeps its state in Python numbers; it must decide as the tensor path does."""
    model, ids = deep_model("llama"), batch_ids(rows=1, length=12)
    for method in ("ffn-skip", "lac"):
        policy = skipping(method, warmup=0)
        with apply_policy(model, policy, check_model=False, record=True) as handle:
            cache = model(ids[:, :6], use_cache=True).cache
            for position in range(6, 12):
                cache = model(ids[:, position:position + 1], cache=cache, use_cache=True).cache
        stepwise = torch.cat([m.grid("mlp", LAYERS) for m in handle.maps], dim=2)
        with apply_policy(model, policy, check_model=False, record=True) as batched:
            model(ids)
        assert torch.equal(stepwise, batched.maps[0].grid("mlp", LAYERS)), method


def first_skipped_layers(grid: torch.Tensor) -> list[int | None]:
    """Per token of a [layers, batch, tokens] run grid: the first layer whose MLP it skipped, or None."""
    out = []
    for column in grid.flatten(1).t():
        skipped = (~column).nonzero()
        out.append(int(skipped[0]) if len(skipped) else None)
    return out


@pytest.mark.parametrize("method", ["ffn-skip", "lac"])
def test_last_check_keeps_the_halts_decided_up_to_it_and_no_others(method):
    model, ids = deep_model("llama"), batch_ids(rows=3, length=24, seed=5)
    threshold = {"ffn-skip": 0.8, "lac": 0.3}[method]  # tokens halt at every skippable layer, some never
    settings = dict(protect_first=2, protect_last=1, warmup=0)
    every = make_policy(method, LAYERS, threshold, **settings)
    assert every.last_check == LAYERS - 1 - 2  # default: the last layer whose signal decides a skippable one
    with apply_policy(model, every, check_model=False, record=True) as full:
        model(ids)
    halts = first_skipped_layers(full.maps[0].grid("mlp", LAYERS))
    horizon = 3
    assert any(h is not None and h - 1 <= horizon for h in halts) and any(h is None or h - 1 > horizon for h in halts)
    early_policy = make_policy(method, LAYERS, threshold, last_check=horizon, **settings)
    with apply_policy(model, early_policy, check_model=False, record=True) as early:
        model(ids)
    expected = [h if h is not None and h - 1 <= horizon else None for h in halts]
    assert first_skipped_layers(early.maps[0].grid("mlp", LAYERS)) == expected


def test_observers_sit_only_on_the_layers_whose_signal_can_decide():
    model = deep_model("llama")
    layers = model.model.layers
    policy = make_policy("ffn-skip", LAYERS, 0.5, protect_first=3, protect_last=1, window=2, last_check=4)
    with apply_policy(model, policy, check_model=False):
        observed = [i for i, layer in enumerate(layers) if "forward" in vars(layer)]
    assert observed == [1, 2, 3, 4]  # window 2 before the first skippable layer (3), up to last_check
    with apply_policy(model, make_policy("lac", LAYERS, 0.5, protect_first=3, protect_last=1), check_model=False):
        observed = [i for i, layer in enumerate(layers) if "forward" in vars(layer)]
    assert observed == list(range(0, LAYERS - 2))  # lac's range needs every earlier layer's change
    assert not any("forward" in vars(layer) for layer in layers)  # removed


@pytest.mark.parametrize("last_check", [0, 7, 2.5, True])
def test_last_check_out_of_range_is_refused(last_check):
    with pytest.raises(PlanError, match="last_check"):
        make_policy("ffn-skip", LAYERS, 0.5, protect_first=2, protect_last=1, last_check=last_check)


# -- calibration, files, errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ffn-skip", "lac"])
def test_calibration_reaches_the_requested_skip_ratio(method):
    model = deep_model("llama")
    batches = [batch_ids(rows=1, length=48, seed=s) for s in range(2)]
    policy = calibrate(model, method, batches, 0.3, protect_first=2, protect_last=1)
    measured = measure_skip_ratio(model, policy, batches)
    assert measured == pytest.approx(policy.provenance["calibrated_skip_ratio"])
    assert abs(measured - 0.3) < 0.05
    assert policy.model is not None  # stamped for the model it was calibrated on


def test_automatic_last_check_weighs_saved_mlps_against_checks():
    model = deep_model("llama")
    batches = [batch_ids(rows=1, length=48, seed=s) for s in range(2)]
    policy = make_policy("ffn-skip", LAYERS, 0.8, protect_first=2, protect_last=1)  # halts spread over the layers
    latest = policy.last_check
    assert best_last_check(model, policy, batches, check_cost=0.0) <= latest
    # free checks: no horizon saves more than one that keeps every halt
    free = best_last_check(model, policy, batches, check_cost=0.0)
    with apply_policy(model, policy, check_model=False, record=True) as handle:
        for batch in batches:
            model(batch)
    halts = [h for m in handle.maps for h in first_skipped_layers(m.grid("mlp", LAYERS)) if h is not None]
    assert free == max(halts) - 1
    # costly checks: the earliest horizon, and calibration still reaches the ratio with it
    assert best_last_check(model, policy, batches, check_cost=100.0) == policy.protect_first - 1
    costly = calibrate(model, "ffn-skip", batches, 0.3, protect_first=2, protect_last=1, check_cost=100.0)
    assert costly.last_check == 1 and costly.provenance["last_check"] == "auto"
    assert abs(measure_skip_ratio(model, costly, batches) - 0.3) < 0.05
    fixed = calibrate(model, "ffn-skip", batches, 0.3, protect_first=2, protect_last=1, last_check=None)
    assert fixed.last_check == latest and "last_check" not in fixed.provenance


def test_calibration_refuses_an_unreachable_ratio():
    with pytest.raises(PlanError, match="out of reach"):
        calibrate(deep_model("llama"), "ffn-skip", [batch_ids()], 0.9, protect_first=2, protect_last=1)


def test_skip_ratio_for_speedup_follows_the_latency_model():
    from skiplm.measure.latency import LatencyModel

    latency = LatencyModel(fixed_s=0.010, attention_s=0.0005, mlp_s=0.001, num_layers=20, batch_size=1, context=64)
    ratio = skip_ratio_for_speedup(latency, 20, 1.25)
    # skipping ratio * 20 MLPs saves ratio * 20 ms of a 40 ms step
    assert latency.full_s / (latency.full_s - ratio * 20 * latency.mlp_s) == pytest.approx(1.25)


def test_policy_file_round_trip_and_dispatch(tmp_path):
    model = deep_model("llama")
    policy = skipping("lac", parts="mlp").for_model(model)
    path = policy.save(tmp_path / "lac.json")
    loaded = load_skipper(path)
    assert isinstance(loaded, LAC) and loaded.settings() == policy.settings() and loaded.model == policy.model
    plan_path = plan_for(cached_tiny_model("llama"), blocks=[1]).save(tmp_path / "plan.json")
    assert isinstance(load_skipper(plan_path), skiplm.SkipPlan)


def test_policy_for_another_model_is_refused():
    policy = skipping("ffn-skip").for_model(deep_model("llama"))
    with pytest.raises(PlanMismatchError, match="skiplm policy"):
        skiplm.apply(deep_model("qwen2"), policy)
    with pytest.raises(PlanMismatchError, match="layers"):
        skiplm.apply(cached_tiny_model("llama"), policy)  # 5 layers, policy for 8


@pytest.mark.parametrize("bad,match", [
    ({"thresholds": {"decode": "high"}}, "number"),
    ({"thresholds": {"later": 0.5}}, "per phase"),
    ({"thresholds": {"decode": 0.5}, "protect_first": 4, "protect_last": 4}, "protect every"),
    ({"thresholds": {"decode": 0.5}, "speed": 3}, "unknown"),
])
def test_malformed_policy_files_are_explained(tmp_path, bad, match):
    data = {"format": "skiplm.policy", "schema_version": 1, "method": "ffn-skip", "num_layers": LAYERS,
            "settings": bad, "model": None}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=match):
        load_skipper(path)


def test_a_plan_and_a_policy_cannot_both_be_applied():
    model = deep_model("llama")
    with skiplm.apply(model, skiplm.SkipPlan.from_layers(LAYERS, blocks=[3]), check_model=False):
        with pytest.raises(PlanError, match="already"):
            apply_policy(model, skipping("lac"), check_model=False)


def test_activation_maps_summary_and_plot(tmp_path):
    model, ids = deep_model("llama"), batch_ids(rows=1)
    with apply_policy(model, skipping("lac"), check_model=False, record=True) as handle:
        model.generate(ids, max_new_tokens=4, do_sample=False)
    summary = activation_summary(handle.maps, LAYERS)
    assert set(summary) == {"prefill", "decode"}
    prefill = summary["prefill"]
    assert prefill["tokens"] == ids.shape[1]
    assert prefill["mlp_active_by_layer"][0] == 1.0  # protected
    skipped = sum(1 - share for share in prefill["mlp_active_by_layer"]) * prefill["tokens"]
    assert skipped == pytest.approx(handle.stats.mlp_total["prefill"] - handle.stats.mlp_run["prefill"])
    path = plot_activation_maps(handle.maps, LAYERS, tmp_path / "map.png", "lac")
    assert path.stat().st_size > 1000


# -- the command line, on the tiny model folder with the real tokenizer ------------------------------------------------
def test_cli_policy_then_generate_eval_bench(tiny_folder, tmp_path):
    from conftest import run_cli

    policy_file = tmp_path / "lac.json"
    result = run_cli("policy", tiny_folder, "--method", "lac", "--skip-ratio", "0.2", "--protect-first", 1,
                     "--protect-last", 1, "--sequences", 2, "--length", 32, "-o", policy_file)
    assert result.exception is None, result.output
    policy = load_skipper(policy_file)
    assert isinstance(policy, LAC) and policy.provenance["target_skip_ratio"] == 0.2
    assert policy.provenance["corpus"] == "gsm8k" and policy.model.num_layers == 4

    result = run_cli("generate", tiny_folder, "--policy", policy_file, "--prompt", "Hello", "--max-new-tokens", 5,
                     "--activation-map", tmp_path / "map.png")
    assert result.exception is None, result.output
    summary = json.loads((tmp_path / "map.json").read_text())
    assert summary["kind"] == "activation-map" and set(summary["activations"]) == {"prefill", "decode"}
    assert (tmp_path / "map.png").stat().st_size > 1000

    result = run_cli("eval", tiny_folder, "--policy", policy_file, "--corpus", "pydoc", "--tokens", 64, "--context",
                     32, "--stride", 16, "-o", tmp_path / "eval")
    assert result.exception is None, result.output
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())["perplexity"]["pydoc"]
    assert scores["lac"]["tokens_scored"] == 64

    result = run_cli("bench", tiny_folder, "--policy", policy_file, "--batch-sizes", "1,2", "--prompt-tokens", 8,
                     "--decode-prompt-tokens", 16, "--decode-prompts", "gsm8k-chat", "--new-tokens", 2, "--repeats",
                     1, "--warmup", 0, "-o", tmp_path / "bench")
    assert result.exception is None, result.output
    data = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert set(data["speed"]) == {"full", "lac", "lac (decisions only)", "static probe: skippable MLPs skipped"}
    accounting = data["speed"]["lac"]["decode_b1"]["policy"]
    assert {"skipped_mlps_per_token", "mlp_s", "saved_s_per_token", "decision_overhead_s_per_token"} <= set(accounting)
    markdown = (tmp_path / "bench" / "bench.md").read_text()
    assert "Input-adaptive policies" in markdown and "chat template" in markdown

    for args, message in ((("--policy", "lac"), "calibrate one"), (("--policy", policy_file, "--plan", policy_file),
                                                                     "does not combine")):
        result = run_cli("generate", tiny_folder, "--prompt", "Hi", *args)
        assert isinstance(result.exception, PlanError) and message in str(result.exception)
    result = run_cli("policy", tiny_folder, "--method", "lac", "--skip-ratio", "0.2", "--last-check", "soon", "-o",
                     tmp_path / "x.json")
    assert isinstance(result.exception, PlanError) and "--last-check" in str(result.exception)
    result = run_cli("export", tiny_folder, "--plan", policy_file, "-o", tmp_path / "out")
    assert isinstance(result.exception, PlanError) and "no fixed set of layers" in str(result.exception)
