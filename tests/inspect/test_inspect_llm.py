"""`quantsink inspect` on the causal LMs (the session's inspections, conftest.py): the planted
Llamas' emergence layer, massive channels and sink tokens, the trained sink LM's [BOS] sink on
channel 82 at block 0, what PFN-5 would keep beside them, and per-layer KV sensitivity."""
import torch

from quantsink.testing.planted_llm import BOS, DELIMITERS

SINK_TEXTS = {BOS, *DELIMITERS}


def test_names_the_planted_emergence_layer_and_channels(llm_case):
    saved, plan = llm_case["saved"], llm_case["plan"]
    profile = saved["kvsink"]["profile"]
    if plan is None:  # the trained sink LM (quantsink.testing.sink_lm's docstring): channel 82 from block 0
        assert (profile["emergence_layer"], profile["channels"][0]) == (0, 82)
        return
    assert profile["emergence_layer"] == plan.emergence_layer == saved["massive"]["emergence_block"]
    assert set(plan.massive_channels) <= set(profile["channels"])
    assert set(profile["channels"][:2]) == set(plan.massive_channels)


def test_predicted_sinks_are_the_planted_sink_tokens_and_most_lie_beyond_pfn(llm_case):
    name = llm_case["name"]
    for sample in llm_case["saved"]["kvsink"]["sample_sinks"]:
        predicted = [entry["token"] for entry in sample["kvsink"]]
        assert predicted[0] == BOS and sample["kvsink"][0]["position"] == 0
        assert [entry["token"] for entry in sample["pfn"]][0] == BOS
        if name == "planted":  # every "." and "\n" is a full sink, as massive as the next
            assert set(predicted) <= SINK_TEXTS
        elif name == "realistic":  # graded: [BOS], the first delimiter (90x), the second (29x)
            assert predicted[1] in DELIMITERS and predicted[2] in DELIMITERS
            scores = [entry["score"] for entry in sample["kvsink"]]
            assert scores[1] > 50 and 15 < scores[2] < 50 and scores[3] < 5
    kvsink = llm_case["saved"]["kvsink"]
    if name != "sink-lm":
        assert kvsink["predicted_beyond_pfn"] >= kvsink["predicted_total"] // 2


def test_kv_sensitivity_per_layer_and_sinks(llm_case):
    kv = llm_case["saved"]["kv_sensitivity"]
    layers = len(llm_case["saved"]["blocks"])
    for bits in ("4", "2"):
        assert len(kv["per_layer_kl"][bits]) == layers
        assert all(value >= 0 for value in kv["per_layer_kl"][bits])
    two = kv["all_layers_kl"]["2"]
    assert two["kvsink-5"] <= two["pfn-5"] <= two["none"]
    assert sum(kv["per_layer_kl"]["2"]) > sum(kv["per_layer_kl"]["4"])


def test_attention_sinks_are_where_the_fixture_parks(llm_case):
    plan, saved = llm_case["plan"], llm_case["saved"]
    if plan is None:
        return
    for shown in saved["shown"]:
        for layer in plan.parking_layers:
            received = torch.tensor(shown["attention_received"][layer])
            assert shown["tokens"][int(received.argmax())] in SINK_TEXTS


def test_recommended_kv_recipe(llm_case):
    recipe = llm_case["inspection"].recommend()
    sinks = recipe.kv_cache.sinks
    assert sinks.method == "kvsink" and sinks.num_sinks >= 5
    assert recipe.kv_cache.bits == llm_case["default"].kv_cache.bits
    # the layers whose 2-bit KV alone costs a quarter of all layers' stay exact in the recipe itself
    kv = llm_case["inspection"].data["kv_sensitivity"]
    whole = kv["all_layers_kl"]["2"]["none"]
    expected = [layer for layer, kl in enumerate(kv["per_layer_kl"]["2"]) if kl >= 0.25 * whole]
    assert expected and recipe.kv_cache.exact_layers == expected
