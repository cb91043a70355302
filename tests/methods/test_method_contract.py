"""A method plugs in through the registry, installs before quantization, and its state and
tensors travel through export so that load reproduces the model."""
import pytest
import torch
from pydantic import BaseModel, ConfigDict

import quantsink
from quantsink.data import load_samples
from quantsink.errors import UserError
from quantsink.exports.folder import load_adapter, restore_methods
from quantsink.methods.base import Method, require_capabilities
from quantsink.models.capabilities import EditableEncoder, KVCacheHost
from quantsink.registry import METHODS
from quantsink.testing.tiny import TINY_FAMILIES, build_tiny, build_tiny_causal_lm


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


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@METHODS.register("test-needs-kv-cache")
class NeedsKVCache(Method):
    """Declares a capability, as kvsink and kv-static need a KV-cache host."""

    name = "test-needs-kv-cache"
    options_model = NoOptions
    requires = (KVCacheHost,)

    def apply(self, context):
        return {"kv_heads": context.adapter.num_key_value_heads}

    def state(self):
        return {}, {}

    @classmethod
    def restore(cls, adapter, state, tensors):
        return cls(NoOptions())


NO_KV_CACHE = (r"^test-needs-kv-cache applies to causal language models \(the hosts of a KV cache\); \S+ is an image model "
               r"whose hf-clip adapter offers no KVCacheHost: remove test-needs-kv-cache from the recipe's methods$")


def test_a_method_refuses_once_a_model_without_a_capability_it_requires(tmp_path):
    with pytest.raises(UserError, match=NO_KV_CACHE):
        quantsink.quantize(build_tiny("hf-clip").model, {"methods": [{"test-needs-kv-cache": {}}]}, progress=False)
    with pytest.raises(UserError, match=NO_KV_CACHE):
        restore_methods(build_tiny("hf-clip"), [{"name": "test-needs-kv-cache", "state": {}}], tmp_path)
    require_capabilities(NeedsKVCache, build_tiny_causal_lm("llama"))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_offers_the_capabilities_of_its_kind(family):
    adapter = build_tiny(family)
    assert isinstance(adapter, EditableEncoder) == (adapter.modality == "image")
    assert not isinstance(adapter, KVCacheHost)


def test_a_causal_lm_hosts_a_kv_cache_and_offers_no_sequence_edits():
    adapter = build_tiny_causal_lm("llama")
    assert isinstance(adapter, KVCacheHost) and not isinstance(adapter, EditableEncoder)
