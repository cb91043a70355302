"""The real all-MiniLM-L6-v2 (a text encoder) names its [CLS] outlier and the channel that
predicts it, as quantsink.methods.sink_tokens' docstring measured: channel 99 at block 0's MLP
input; the recommended recipe protects it with sink-tokens."""
from quantsink.inspection.run import inspect


def test_minilm_names_its_cls_outlier_and_channel():
    inspection = inspect("all-minilm-l6-v2", num_samples=8, progress=False)
    outliers = inspection.data["sink_tokens"]
    emergence = next(layer for layer in outliers["layers"] if layer["linear"] == outliers["emergence"])
    assert outliers["channel"] == 99 and list(emergence["top_tokens"]) == ["[CLS]"]
    assert inspection.recommend().methods == [{"sink-tokens": {"outlier_ratio": 5.0, "protect": "with_outliers"}}]
    assert inspection.data["massive"]["emergence_block"] == 0
