"""Weights streamed from disk (quantsink.models.streaming): with `execution.offload_dir` a model
folder loads with its blocks on the meta device, one block is resident at a time in the passes,
each is quantized as it comes back for good after calibration, and the folder written is
bit-identical to the in-memory run's; what would lose writes is refused up front."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantsink.cli import main
from quantsink.errors import CheckpointError, UserError
from quantsink.models import resolve, save_model
from quantsink.models.streaming import StreamedWeights, streamed
from quantsink.quantizers.fake import FakeQuantizer
from quantsink.quantizers.int8 import Int8Linear
from quantsink.pipeline import run
from quantsink.recipe import Recipe
from quantsink.testing.planted_llm import save_planted_llama
from quantsink.testing.tiny import build_tiny, build_tiny_causal_lm

CALIBRATION = {"num_samples": 12, "batch_size": 4, "holdout": 4, "seq_len": 24}


def w8a8(backend):
    return {"backend": backend, "activations": {"dynamic": False}}


def as_hf_folder(adapter, folder):
    adapter.model.save_pretrained(folder)
    if adapter.processor is not None:
        adapter.processor.save_pretrained(folder)
    return folder


def both(spec, recipe, offload):
    reference, _ = run(spec, Recipe.from_dict(recipe), progress=False)
    streamed_run, _ = run(spec, Recipe.from_dict({**recipe, "execution": {"pipeline": "sequential", "offload_dir": str(offload)}}),
                          progress=False)
    return reference, streamed_run


def assert_same_folder_contents(reference, other):
    state, other_state = reference.adapter.model.state_dict(), other.adapter.model.state_dict()
    assert state.keys() == other_state.keys()
    differing = [name for name in state if not torch.equal(state[name], other_state[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    assert reference.report["fidelity"] == other.report["fidelity"]


SOURCES = {
    # (how the folder is written, the model, the backend)
    "quantsink folder, CLIP, int8": (save_model, lambda: build_tiny("hf-clip"), "int8"),
    "hf folder, SigLIP 2 (Linear patch embedding), fake": (as_hf_folder, lambda: build_tiny("hf-siglip2"), "fake"),
    "hf folder, DINOv2 (a backbone config), int8": (as_hf_folder, lambda: build_tiny("hf-dinov2"), "int8"),
    "hf folder, Qwen2 (per-layer attention types), int8": (as_hf_folder, lambda: build_tiny_causal_lm("qwen2"), "int8"),
    "quantsink folder, OpenCLIP, fake": (save_model, lambda: build_tiny("open-clip"), "fake"),
    "quantsink folder, timm ViT, int8": (save_model, lambda: build_tiny("timm-vit"), "int8"),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_streamed_run_writes_what_the_in_memory_run_writes(source, tmp_path):
    write, build, backend = SOURCES[source]
    folder = write(build(), tmp_path / "model")
    reference, streamed_run = both(str(folder), {"name": "s", "calibration": CALIBRATION, "quantization": w8a8(backend)},
                                   tmp_path / "offload")
    assert_same_folder_contents(reference, streamed_run)
    assert streamed(streamed_run.adapter) is None, "the quantized model stays tied to the offload folder"
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())


def test_tied_embeddings_are_tied_again(tmp_path):
    adapter = build_tiny_causal_lm("llama")
    adapter.model.config.tie_word_embeddings = True
    adapter.model.tie_weights()
    folder = as_hf_folder(adapter, tmp_path / "model")
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # transformers saves a tied head once
    loaded = resolve(folder, stream_weights=True)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    streamed(loaded).close()


def test_one_block_is_resident_at_a_time_and_each_is_quantized_as_it_comes_back(tmp_path, monkeypatch):
    folder = save_model(build_tiny("hf-clip"), tmp_path / "model")
    resident_counts, onloaded = [], []
    original = StreamedWeights.onload

    def counting(self, index):
        original(self, index)
        onloaded.append(index)
        resident_counts.append(len(self.resident))

    monkeypatch.setattr(StreamedWeights, "onload", counting)
    loaded = resolve(folder, stream_weights=True)
    assert all(tensor.is_meta for block in loaded.blocks() for tensor in block.state_dict().values())
    assert not any(tensor.is_meta for name, tensor in loaded.model.state_dict().items() if ".layers." not in name)
    streamed(loaded).close()
    frozen_on_arrival = []
    original_freeze = FakeQuantizer.freeze

    def freeze(self, model):
        frozen_on_arrival.append(sum(isinstance(module, Int8Linear) for module in model.modules()))
        original_freeze(self, model)

    monkeypatch.setattr(FakeQuantizer, "freeze", freeze)
    result, _ = run(str(folder), Recipe.from_dict({"name": "s", "calibration": CALIBRATION, "quantization": w8a8("int8"),
                                                   "execution": {"pipeline": "sequential", "offload_dir": str(tmp_path / "o")}}),
                    progress=False)
    blocks = len(result.adapter.blocks())
    assert onloaded[-2 * blocks:] == [*range(blocks), *range(blocks)]  # the calibration pass, then coming back
    assert max(resident_counts[:-blocks]) == 1, "more than one block was resident in the passes"
    # each block quantized alone as it came back (no int8 layer in it yet), then the rest of the model
    assert frozen_on_arrival[:blocks] == [0] * blocks and len(frozen_on_arrival) == blocks + 1


def test_kvsink_profile_and_w8a8_match_in_memory(tmp_path):
    """The planted Llama with a kvsink KV cache and W8A8 weights: the sink profile too."""
    folder = save_planted_llama(tmp_path / "llama")
    recipe = Recipe.from_yaml("recipes/planted-llama-kv2-kvsink.yaml").to_dict()
    recipe.update(calibration={**recipe["calibration"], "num_samples": 8, "holdout": 2}, quantization=w8a8("int8"))
    reference, streamed_run = both(str(folder), recipe, tmp_path / "offload")
    assert_same_folder_contents(reference, streamed_run)
    profiles = [next(method for method in result.methods if method.name == "kvsink").state()[0] for result in (reference, streamed_run)]
    assert profiles[0] == profiles[1]
    assert reference.report["kv_cache"] == streamed_run.report["kv_cache"]


@pytest.mark.parametrize("case, recipe, message", [
    ("regcache", {"methods": [{"regcache": {}}]}, "regcache writes the model's weights"),
    ("smoothquant", {"methods": [{"smoothquant": {}}]}, "smoothquant writes the model's weights"),
    ("torchao", {"quantization": {"backend": "torchao"}}, "backend torchao quantizes the whole model at once"),
])
def test_what_would_lose_writes_is_refused_before_loading(case, recipe, message, tmp_path):
    full = {"name": "s", "calibration": CALIBRATION, "quantization": w8a8("fake"),
            "execution": {"pipeline": "sequential", "offload_dir": str(tmp_path / "offload")}, **recipe}
    with pytest.raises(UserError, match=message):
        run(str(tmp_path / "never-read"), Recipe.from_dict(full), progress=False)
    assert not (tmp_path / "offload").exists()


def test_offload_dir_needs_the_sequential_pipeline():
    with pytest.raises(UserError, match="execution: offload_dir .* needs pipeline: sequential"):
        Recipe.from_dict({"name": "s", "execution": {"offload_dir": "/tmp/x"}})


def test_a_module_in_memory_cannot_stream(tmp_path):
    with pytest.raises(UserError, match="a module in memory is not one"):
        resolve(build_tiny("hf-clip").model, stream_weights=True)


def test_a_checkpoint_missing_a_block_tensor_is_refused(tmp_path):
    folder = save_model(build_tiny("hf-clip"), tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    missing = next(name for name in tensors if ".layers.1." in name)
    del tensors[missing]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"lacks {missing}"):
        resolve(folder, stream_weights=True)


def test_cli_offload_dir_writes_the_in_memory_folder(tmp_path):
    """`--offload-dir` streams the weights and the block inputs: the same model.safetensors bytes'
    tensors, and an offload folder left empty."""
    folder = save_model(build_tiny("hf-clip"), tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Recipe.from_dict({"name": "s", "calibration": CALIBRATION, "quantization": w8a8("int8")}).to_yaml())
    assert main(["quantize", str(folder), str(recipe), "-o", str(tmp_path / "in-memory"), "--quiet"]) == 0
    assert main(["quantize", str(folder), str(recipe), "-o", str(tmp_path / "streamed"), "--quiet",
                 "--offload-dir", str(tmp_path / "offload")]) == 0
    written = [load_file(tmp_path / out / "model.safetensors") for out in ("in-memory", "streamed")]
    assert written[0].keys() == written[1].keys()
    assert all(torch.equal(written[0][name], written[1][name]) for name in written[0])
    saved = Recipe.from_yaml(tmp_path / "streamed" / "recipe.yaml")
    assert saved.execution.pipeline == "sequential" and saved.execution.offload_dir == str(tmp_path / "offload")
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())


def test_a_refused_recipe_leaves_nothing_in_the_offload_folder(tmp_path):
    """A check after loading (a KV cache recipe on a vision encoder) fails: nothing was written."""
    folder = save_model(build_tiny("hf-clip"), tmp_path / "model")
    recipe = {"name": "s", "calibration": CALIBRATION, "kv_cache": {"bits": 4},
              "execution": {"pipeline": "sequential", "offload_dir": str(tmp_path / "offload")}}
    with pytest.raises(UserError, match="kv"):
        run(str(folder), Recipe.from_dict(recipe), progress=False)
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())


def test_sink_tokens_on_real_minilm_weights_streamed(tmp_path):
    """The packaged all-MiniLM-L6-v2 by its short name: sink-tokens' profile passes run with the
    blocks coming in per call, its predictor's rows kept per batch in the sequential pass."""
    recipe = {"name": "s", "calibration": {"num_samples": 16, "batch_size": 8, "holdout": 4, "seq_len": 32},
              "methods": [{"sink-tokens": {"outlier_ratio": 5.0}}], "quantization": w8a8("int8")}
    reference, streamed_run = both("all-minilm-l6-v2", recipe, tmp_path / "offload")
    assert_same_folder_contents(reference, streamed_run)
    profiles = [next(method for method in result.methods if method.name == "sink-tokens").state()[0] for result in (reference, streamed_run)]
    assert profiles[0] == profiles[1]
