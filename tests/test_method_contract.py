"""A method plugs in through the registry, installs before quantization, and its state and
tensors travel through export so that load reproduces the model."""
import pytest
import torch
from pydantic import BaseModel, ConfigDict

import quantsink
from quantsink.data import load_samples
from quantsink.errors import UserError
from quantsink.export import load_adapter
from quantsink.methods.base import Method
from quantsink.registry import METHODS
from quantsink.testing.tiny import build_tiny


class GainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gain: float = 2.0


@METHODS.register("test-block-gain")
class BlockGain(Method):
    """Scales the first block's output by a per-channel gain held outside the state_dict."""

    name = "test-block-gain"
    options_model = GainOptions

    def apply(self, context):
        width = context.adapter.blocks()[0].mlp.fc2.out_features
        self.install(context.adapter, torch.full((width,), self.options.gain))
        return {"batches_seen": len(context.calibration_batches), "trial_backend": type(context.make_quantizer()).__name__}

    def install(self, adapter, gain):
        self.gain = gain
        adapter.blocks()[0].register_forward_hook(lambda _m, _i, out: (out[0] * gain,) + tuple(out[1:]) if isinstance(out, tuple) else out * gain)

    def state(self):
        return {"width": self.gain.numel()}, {"gain": self.gain}

    @classmethod
    def restore(cls, adapter, state, tensors):
        assert tensors["gain"].numel() == state["width"]
        method = cls(GainOptions())
        method.install(adapter, tensors["gain"])
        return method


RECIPE = {
    "name": "gain",
    "calibration": {"num_samples": 4, "batch_size": 2, "holdout": 2},
    "methods": [{"test-block-gain": {"gain": 3.0}}],
}


def test_method_state_round_trips_through_export(tmp_path):
    result = quantsink.quantize(build_tiny("hf-clip").model, RECIPE, progress=False)
    assert result.report["methods"]["test-block-gain"] == {"batches_seen": 2, "trial_backend": "FakeQuantizer"}
    result.save(tmp_path / "out")
    loaded = load_adapter(tmp_path / "out")
    inputs = result.adapter.preprocess(load_samples("bundled", "image", 2, 1).calibration)
    assert torch.equal(loaded.embed(inputs), result.adapter.embed(inputs))


def test_method_options_are_validated_with_their_path():
    with pytest.raises(UserError, match=r"methods\.0\.test-block-gain\.gain: "):
        quantsink.Recipe.from_dict({"methods": [{"test-block-gain": {"gain": "loud"}}]})
    with pytest.raises(UserError, match=r"methods\.0\.test-block-gain\.volume: unknown field"):
        quantsink.Recipe.from_dict({"methods": [{"test-block-gain": {"volume": 1}}]})
