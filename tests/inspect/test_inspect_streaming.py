"""The inspection pass reduces each batch as it goes: per block it keeps a few numbers per batch
and the rows of the shown samples only, whatever the number of samples; what it reduces agrees
with the calibration pass's ActivationStats, and the attention it reads with the model's own
eager attention weights. And `quantsink quantize` draws report.md's figures from its report."""
import torch

from inspect_checks import check_figure
from quantsink import api
from quantsink.calibration import StatisticsCollector
from quantsink.data import batched, load_samples
from quantsink.inspection.collect import InspectionCollector
from quantsink.recipe import Recipe
from quantsink.testing.tiny import build_tiny

SAMPLES, BATCH, SHOWN = 24, 4, 2


def test_memory_is_a_few_numbers_per_batch_and_the_shown_rows(tmp_path):
    adapter = build_tiny("hf-clip")
    samples = load_samples("bundled", "image", SAMPLES, 0, 0).calibration
    batches = [adapter.preprocess(chunk) for chunk in batched(samples, BATCH)]
    collector = InspectionCollector(adapter, [], SHOWN)
    collector.run_all((inputs, None) for inputs in batches)
    reference = StatisticsCollector(adapter)
    with reference.attached():
        reference.collect(batches)
    stats = reference.result()
    for index, stream in enumerate(collector.blocks):
        assert len(stream.shown) == len(stream.received) == SHOWN
        assert len(stream.medians) == len(stream.largest_share) == SAMPLES // BATCH
        summary, expected = stream.summary(stats.block_names[index]), stats.block_summary(index)
        assert summary["max_token_linf"] == expected["max_token_linf"]
        assert [entry["channel"] for entry in summary["top_channels"][:5]] == [entry["channel"] for entry in expected["top_channels"]]
        assert [(entry["sample"], entry["token"]) for entry in summary["top_tokens"]] == \
            [(entry["sample"], entry["token"]) for entry in expected["top_tokens"]]
        assert torch.equal(stream.shown[1], stats.token_linf[index][1])


def test_attention_received_is_the_models_eager_attention():
    """Read under sdpa (recomputed from its query and keys), checked against eager's weights."""
    adapter = build_tiny("hf-clip")
    inputs = adapter.preprocess(load_samples("bundled", "image", SHOWN, 0, 0).calibration)
    collector = InspectionCollector(adapter, [], SHOWN)
    collector.run_all(iter([(inputs, None)]))
    adapter.model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = adapter.model(**inputs, output_attentions=True).attentions
    for stream, weights in zip(collector.blocks, attentions):
        expected = weights.mean(dim=1).mean(dim=1)  # over heads, then queries
        assert torch.allclose(torch.stack(stream.received), expected, atol=1e-5)


def test_quantize_writes_report_md_with_figures_from_its_report(tiny_clip, tmp_path):
    recipe = Recipe.from_dict({"name": "r", "calibration": {"num_samples": 4, "holdout": 2, "batch_size": 2}})
    result = api.quantize(str(tiny_clip), recipe, progress=False)
    out = result.save(tmp_path / "out")
    page = (out / "report.md").read_text()
    assert "](channels.png)" in page
    check_figure(out / "channels.png")
    assert f"{result.report['fidelity']['centered_cosine_mean']:.4f}" in page
