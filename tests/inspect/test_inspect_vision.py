"""`quantsink inspect` on the two planted CLIP fixtures (the session's inspections, conftest.py):
inspect.json names the planted emergence block, massive channels, sensitive layer and sink
patches, and the parking blocks' attention lands on them."""
import torch

from quantsink.data import load_samples
from quantsink.inspection.run import SHOWN
from quantsink.models import resolve
from quantsink.testing.planted_clip import MARK

def marked_tokens(vision_case) -> list[set[int]]:
    """Ground truth: per shown image, the tokens the fixture's selection block marks (+-MARK in
    the massive channels, from the model's own hidden states), the would-be sinks."""
    adapter = resolve(vision_case["build"](seed=0))
    samples = load_samples("bundled", "image", vision_case["default"].calibration.num_samples, 0, 0).calibration[:SHOWN]
    with torch.no_grad():
        hidden = adapter.model(**adapter.preprocess(samples), output_hidden_states=True).hidden_states
    channel = vision_case["plan"].massive_channels[0]
    selected = hidden[vision_case["plan"].selection_block + 1][..., channel].abs() > MARK / 2
    return [set(row.nonzero().flatten().tolist()) for row in selected]


def test_names_the_planted_emergence_block_and_channels(vision_case):
    massive = vision_case["saved"]["massive"]
    assert massive["emergence_block"] == vision_case["plan"].emergence_block
    planted = set(vision_case["plan"].massive_channels)
    if vision_case["name"] == "emergent":  # its third massive channel tilts each sink's direction
        planted.add(vision_case["plan"].variation_channel)
    assert {entry["channel"] for entry in massive["channels"]} == planted
    assert all(entry["ratio"] > 10 for entry in massive["channels"])


def test_names_the_planted_sensitive_layer(vision_case):
    sensitive = vision_case["saved"]["sensitive_layer"]
    assert sensitive["block"] == vision_case["plan"].emergence_block
    assert sensitive["linear"] == f"encoder.layers.{vision_case['plan'].emergence_block}.mlp.fc2"
    recipe = vision_case["inspection"].recommend()
    assert recipe.methods[0]["regcache"]["sensitive_layer"] == vision_case["plan"].emergence_block


def test_the_massive_patches_are_the_planted_sinks(vision_case):
    """Every massive token at the emergence block is one the selection block marked, and every
    image with a massive token has one of its marks among them (the emergent fixture's gate
    leaves some marks small: not every mark grows)."""
    truth = marked_tokens(vision_case)
    emergence = vision_case["plan"].emergence_block
    for shown, marked in zip(vision_case["saved"]["shown"], truth):
        massive = set(shown["massive_tokens"][emergence])
        assert massive <= marked
        if vision_case["name"] == "planted":
            assert massive == marked
        assert shown["grid"] == [8, 8]
    assert any(shown["massive_tokens"][emergence] for shown in vision_case["saved"]["shown"])


def test_parking_heads_attend_to_the_sinks(vision_case):
    """In the parking blocks the most-attended token of each image with a sink is a sink; before
    the sinks exist no token takes that share."""
    plan, saved = vision_case["plan"], vision_case["saved"]
    for shown in saved["shown"]:
        for block in plan.parking_blocks:
            sinks = shown["massive_tokens"][block]
            if sinks:
                received = torch.tensor(shown["attention_received"][block])
                assert int(received.argmax()) in sinks
    shares = [block["largest_attention_share"] for block in saved["blocks"]]
    assert min(shares[block] for block in plan.parking_blocks) > 2 * max(shares[1:plan.emergence_block])
