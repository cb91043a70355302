"""Refill after a token deletion (`refill: neighbours`): every hidden state a model returns has
its full length, kept positions exactly what the blocks computed on the shortened sequence,
deleted patches the mean of their kept neighbours in each image's own grid (square, H x W,
SigLIP 2 NaFlex with padding); and refills that cannot be done or did not run fail in one line."""
import pytest
import torch
from torch import nn

from quantsink.calibration import StatisticsCollector
from quantsink.data import load_samples
from quantsink.errors import UserError
from quantsink.models.base import hidden_states_of
from quantsink.models.deletion import take_tokens
from quantsink.models.probe import NotRunError, require_runs
from quantsink.testing.tiny import PATCH, TINY_FAMILIES, build_tiny

VISION_FAMILIES = [family for family in TINY_FAMILIES if family != "hf-bert-text"]
BLOCK, COUNT = 1, 3  # delete at block 1: hidden_states[0] and [1] come before it
NAFLEX_SIZES = [(30, 70), (70, 30), (32, 32), (64, 16)]  # (width, height): 5x3, 3x5, 4x4 and 2x8 patches


@pytest.fixture(scope="module")
def images():
    return load_samples("bundled", "image", 4, 1, seed=0).calibration


def naflex_batch(adapter, images):
    """Four aspect ratios in one batch: 15-patch grids get one padding position of 16."""
    inputs = adapter.preprocess([image.resize(size) for image, size in zip(images, NAFLEX_SIZES)])
    assert [tuple(shape) for shape in inputs["spatial_shapes"].tolist()] == [(5, 3), (3, 5), (4, 4), (2, 8)]
    return inputs


def neighbour_means(hidden, kept, grid, lead):
    """Per deleted patch of one image (hidden: (tokens, width)), the mean the refill must give,
    written out over the grid; and how many had no kept neighbour (the image-mean fallback)."""
    rows, columns = grid
    kept = set(kept.tolist())
    kept_patches = [p for p in range(lead, lead + rows * columns) if p in kept]
    means, lonely = {}, 0
    for position in range(lead, lead + rows * columns):
        if position in kept:
            continue
        row, column = divmod(position - lead, columns)
        neighbours = [
            lead + r * columns + c
            for r in range(row - 1, row + 2)
            for c in range(column - 1, column + 2)
            if (r, c) != (row, column) and 0 <= r < rows and 0 <= c < columns and lead + r * columns + c in kept
        ]
        lonely += not neighbours
        means[position] = hidden[neighbours or kept_patches].mean(dim=0)
    return means, lonely


def hidden_states(adapter, inputs, **kwargs):
    output = adapter.model(**inputs, output_hidden_states=True, **kwargs)
    return output.hidden_states, output.last_hidden_state


def assert_refilled(refilled, shortened, kept, grids, lead):
    """`refilled` (batch, tokens, width) holds `shortened` at `kept` and the neighbour means elsewhere."""
    assert torch.equal(take_tokens(refilled, kept, 1), shortened)  # bit for bit: the same computation
    lonely = 0
    for image, grid in enumerate(grids):
        means, alone = neighbour_means(refilled[image], kept[image], grid, lead)
        lonely += alone
        assert len(means) == refilled.shape[1] - kept.shape[1]  # every deleted position lies in the image's grid
        for position, mean in means.items():
            torch.testing.assert_close(refilled[image, position], mean, rtol=1e-5, atol=1e-6)
    return lonely


@pytest.mark.parametrize("family", ["hf-clip", "hf-siglip2"])
def test_every_hidden_state_has_the_full_length_kept_exact_deleted_refilled(family, images):
    adapter = build_tiny(family)
    if family == "hf-siglip2":
        inputs = naflex_batch(adapter, images)
        grids = [tuple(shape) for shape in inputs["spatial_shapes"].tolist()]
    else:
        inputs = adapter.preprocess(images)
        grids = [(4, 4)] * len(images)
    lead = adapter.num_prefix_tokens
    plain, _ = hidden_states(adapter, inputs)
    length = plain[0].shape[1]

    deletion = adapter.delete_tokens_at(BLOCK, COUNT)
    shortened, shortened_last = hidden_states(adapter, inputs)
    kept = deletion.kept.clone()
    deletion.remove()
    # refill: none, what a user gets: the states from the deletion block's output on lack COUNT tokens
    assert [state.shape[1] for state in shortened] == [length] * (BLOCK + 1) + [length - COUNT] * (len(plain) - BLOCK - 1)

    deletion = adapter.delete_tokens_at(BLOCK, COUNT, refill="neighbours")
    refilled, refilled_last = hidden_states(adapter, inputs)
    assert torch.equal(deletion.kept, kept)
    assert len(refilled) == adapter.num_blocks + 1
    assert all(state.shape[1] == length for state in refilled)  # embeddings, every block, the penultimate
    assert refilled_last.shape[1] == length
    for index in range(BLOCK + 1):
        assert torch.equal(refilled[index], plain[index])
    for index in range(BLOCK + 1, len(refilled)):
        assert_refilled(refilled[index], shortened[index], kept, grids, lead)
    # what follows the blocks is per token: the last hidden state is that of the refilled last block
    assert torch.equal(take_tokens(refilled_last, kept, 1), shortened_last)
    if family == "hf-siglip2":
        padding = inputs["pixel_attention_mask"] == 0
        assert padding.sum() == 2
        for image, position in padding.nonzero().tolist():
            assert position in kept[image].tolist()  # never deleted, so never refilled
            assert position >= grids[image][0] * grids[image][1]  # outside the grid: never a neighbour


def test_statistics_and_resumed_runs_see_the_refilled_blocks(images):
    """Calibration statistics and the runs RegCache's search resumes from cached hidden states
    follow the refill: every block output keeps its full length, a resumed forward its result."""
    adapter = build_tiny("hf-siglip2")
    inputs = naflex_batch(adapter, images)
    real = adapter.token_mask(inputs)
    deletion = adapter.delete_tokens_at(BLOCK, COUNT, refill="neighbours")
    collector = StatisticsCollector(adapter)
    with collector.attached():
        (embedding,) = collector.collect([inputs])
    stats = collector.result()
    for block in range(adapter.num_blocks):
        assert torch.equal(adapter.block_output_tokens(block, real), real)
        assert [len(norms) for norms in stats.token_linf[block]] == real.sum(-1).tolist()
    for start in (BLOCK + 1, adapter.num_blocks - 1):
        cached = adapter.hidden_before(start, inputs)
        assert cached.shape[1] == real.shape[1]
        assert torch.equal(adapter.run_from(start, cached, inputs), embedding)
    deletion.remove()


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_every_family_refills_every_block_output(family, images):
    """One mechanism for all: whatever collects block outputs (transformers' recorder, the loops of
    open_clip's and timm's forward_intermediates) sees the full sequence."""
    adapter = build_tiny(family)
    if family == "hf-siglip2":
        inputs = naflex_batch(adapter, images)
        grids = [tuple(shape) for shape in inputs["spatial_shapes"].tolist()]
    else:
        inputs = adapter.preprocess(images)
        grids = [(4, 4)] * len(images)
    outputs = {}

    def block_outputs(refill):
        deletion = adapter.delete_tokens_at(BLOCK, COUNT, refill=refill)
        def keep(index):
            return lambda _module, _args, output: outputs.__setitem__(index, hidden_states_of(output))

        handles = [block.register_forward_hook(keep(index)) for index, block in enumerate(adapter.blocks())]
        adapter.embed(inputs)
        for handle in handles:
            handle.remove()
        return deletion, dict(outputs)

    deletion, shortened = block_outputs("none")
    kept = deletion.kept
    deletion.remove()
    deletion, refilled = block_outputs("neighbours")
    assert torch.equal(deletion.kept, kept)
    for block in range(BLOCK, adapter.num_blocks):
        assert_refilled(refilled[block], shortened[block], kept, grids, adapter.num_prefix_tokens)
    if family in ("open-clip", "timm-vit"):  # their grid-shaped (NCHW) intermediates need every patch
        features = adapter.model.forward_intermediates(
            inputs["pixel_values"], indices=adapter.num_blocks, intermediates_only=True
        )
        features = features["image_intermediates"] if family == "open-clip" else features
        assert [tuple(feature.shape) for feature in features] == [(len(images), 64, 4, 4)] * adapter.num_blocks


@pytest.mark.parametrize("height, width", [(16, 64), (32, 48)])
def test_a_non_square_grid_refills_with_its_own_rows_and_columns(height, width):
    """Replaces the old refusal of non-square grids: 2x8 has a square count (16), where guessing
    4x4 from the count would average the wrong neighbours; 4x6 (24) has none."""
    adapter = build_tiny("hf-clip")
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    inputs = {"pixel_values": pixels, "interpolate_pos_encoding": True}
    grid = (height // PATCH, width // PATCH)
    deletion = adapter.delete_tokens_at(BLOCK, COUNT)
    shortened, _ = hidden_states(adapter, inputs)
    deletion.remove()
    deletion = adapter.delete_tokens_at(BLOCK, COUNT, refill="neighbours")
    refilled, _ = hidden_states(adapter, inputs)
    assert refilled[-2].shape[1] == 1 + grid[0] * grid[1]
    for index in range(BLOCK + 1, len(refilled)):
        assert_refilled(refilled[index], shortened[index], deletion.kept, [grid] * 2, 1)


def test_a_patch_without_kept_neighbours_takes_the_mean_of_its_images_kept_patches(images):
    """14 of 16 patches deleted: two kept patches cannot neighbour all 14 in a 4x4 grid."""
    adapter = build_tiny("hf-clip")
    inputs = adapter.preprocess(images)
    deletion = adapter.delete_tokens_at(BLOCK, 14)
    shortened, _ = hidden_states(adapter, inputs)
    deletion.remove()
    deletion = adapter.delete_tokens_at(BLOCK, 14, refill="neighbours")
    refilled, _ = hidden_states(adapter, inputs)
    lonely = 0
    for index in range(BLOCK + 1, len(refilled)):
        lonely += assert_refilled(refilled[index], shortened[index], deletion.kept, [(4, 4)] * len(images), 1)
    assert lonely >= len(images) * (len(refilled) - BLOCK - 1)


def test_a_sequence_that_is_not_its_patch_grid_is_refused_in_one_line(images):
    """A token the grid does not account for (here one appended after the patches) would make the
    refill average the wrong positions: refused, naming the image, its tokens and its grid."""
    adapter = build_tiny("hf-clip")
    inputs = adapter.preprocess(images)
    extra = lambda _m, _a, output: torch.cat([output, output[:, :1]], dim=1)  # noqa: E731
    adapter.model.vision_model.embeddings.register_forward_hook(extra)
    deletion = adapter.delete_tokens_at(BLOCK, COUNT)
    adapter.embed(inputs)  # without refill the extra token is just another token
    deletion.remove()
    adapter.delete_tokens_at(BLOCK, COUNT, refill="neighbours")
    with pytest.raises(UserError) as error:
        adapter.embed(inputs)
    message = str(error.value)
    assert "\n" not in message
    assert "hf-clip: image 0 has 17 patch tokens after its 1 leading ones, but its patch grid is 4x4" in message


def test_a_block_that_bypasses_its_hooks_fails_the_refills_probe_in_one_line():
    """A refactored encoder that calls a block's forward directly skips its refill: the probe
    that proves an install runs must say so, not return a half-refilled model."""

    class Bypassed(nn.Module):
        def __init__(self, block: nn.Module):
            super().__init__()
            self.block = block

        def forward(self, *args, **kwargs):
            return self.block.forward(*args, **kwargs)

    adapter = build_tiny("hf-clip")
    deletion = adapter.delete_tokens_at(BLOCK, COUNT, refill="neighbours")
    probe = lambda: adapter.embed(adapter.probe_inputs())  # noqa: E731
    require_runs(adapter.model, [deletion.tally], probe)
    layers = adapter.model.vision_model.encoder.layers
    layers[2] = Bypassed(layers[2])
    with pytest.raises(NotRunError) as error:
        require_runs(adapter.model, [deletion.tally], probe)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("the token deletion at block 1 and its refill of blocks 1-3 did not run")


def test_a_forward_whose_patch_grid_was_not_seen_is_refused():
    """The patch embedding swapped after the install (a module the watcher is not on): the next
    forward is refused rather than refilled with the grids of the previous one."""
    adapter = build_tiny("timm-vit")
    adapter.delete_tokens_at(BLOCK, COUNT, refill="neighbours")
    adapter.embed(adapter.probe_inputs())
    watched = adapter.model.patch_embed.proj
    swapped = nn.Conv2d(watched.in_channels, watched.out_channels, watched.kernel_size, watched.stride)
    swapped.load_state_dict(watched.state_dict())
    adapter.model.patch_embed.proj = swapped
    with pytest.raises(NotRunError, match="the token deletion at block 1 of timm-vit saw no patch grid for this batch"):
        adapter.embed(adapter.probe_inputs())
