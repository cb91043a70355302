"""Where calibration computes (execution.device, --device) and accelerate's device_map: a device
this machine lacks is refused before anything loads; cpu, the default here, changes nothing,
bit for bit; device_map auto loads through accelerate and gives the plain load's folder, or is
refused where accelerate would offload; accelerate's device hooks survive the quantizer's module
replacement. With no GPU here, `no_tensor_without_a_device` stands in for one: every tensor
created without a device lands on meta, so a device-less tensor that meets the model's breaks the
pass. The GPU tests at the end skip here."""
import contextlib
import copy
import json

import pytest
import torch
from accelerate import dispatch_model
from safetensors.torch import load_file

from quantsink import distributed, pipeline
from quantsink.api import quantize
from quantsink.cli import main
from quantsink.data import load_samples
from quantsink.errors import UserError
from quantsink.models import hf as hf_models, resolve
from quantsink.models.base import on_device
from quantsink.models.streaming import STREAMED_ATTRIBUTE, HostedBlocks, host_blocks, make_resident
from quantsink.pipeline import calibrate, run
from quantsink.quantizers.fake import FakeQuantLinear
from quantsink.recipe import ExecutionConfig, QuantizationConfig, Recipe
from quantsink.registry import QUANTIZERS
from quantsink.testing.planted_clip import build_planted_clip
from quantsink.testing.planted_llm import save_planted_llama
from quantsink.testing.tiny import build_tiny, build_tiny_causal_lm

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(GPU, reason="refusing cuda needs a machine without one")

W8A8 = {"backend": "fake", "targets": ["Linear"],
        "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False, "observer": "minmax"}}
RECIPE = {"name": "device", "calibration": {"num_samples": 8, "batch_size": 4, "holdout": 4}, "quantization": W8A8}


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    """A tiny CLIP as transformers saves it: what from_pretrained, and so device_map, loads."""
    folder = tmp_path_factory.mktemp("hf") / "clip"
    adapter = build_tiny("hf-clip")
    adapter.model.save_pretrained(folder)
    adapter.processor.save_pretrained(folder)
    return folder


def weights_of(out):
    return load_file(out / "model.safetensors")


def assert_same_weights(one, other):
    assert one.keys() == other.keys()
    differing = [name for name in one if not torch.equal(one[name], other[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def cli_quantize(model, tmp_path, name, *options):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(Recipe.from_dict(RECIPE).to_yaml())
    out = tmp_path / name
    return main(["quantize", str(model), str(recipe), "-o", str(out), "--quiet", *options]), out


# --- resolution and refusals ---------------------------------------------------------------
def test_auto_is_cuda_when_torch_sees_a_gpu_else_cpu():
    assert distributed.device_for("auto") == (torch.device("cuda", torch.cuda.current_device()) if GPU else torch.device("cpu"))
    assert distributed.device_for("cpu") == torch.device("cpu")


@no_gpu
def test_cuda_without_a_gpu_is_refused_before_the_model_loads(tiny_clip, monkeypatch):
    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the model loaded before the device was checked")

    monkeypatch.setattr(pipeline, "resolve", must_not_load)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"^execution.device {device}: torch sees no cuda device on this machine: "
                                            "use --device cpu \\(or auto\\)"):
            quantize(str(tiny_clip), {**RECIPE, "execution": {"device": device}}, progress=False)


@no_gpu
def test_cuda_without_a_gpu_exits_2_from_the_cli_and_writes_nothing(tiny_clip, tmp_path, capsys):
    code, out = cli_quantize(tiny_clip, tmp_path, "out", "--device", "cuda")
    assert code == 2 and not out.exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("quantsink: error: execution.device cuda: torch sees no cuda device") and "\n" not in error


@pytest.mark.parametrize("execution, message", [
    ({"device": "gpu"}, "execution.device: expected auto, cpu, cuda, cuda:N, mps or xpu, got 'gpu'"),
    ({"max_memory": {"cpu": "8GiB"}}, "execution: max_memory bounds what accelerate places on each device: it needs device_map: auto"),
    ({"device_map": "auto", "max_memory": {"gpu0": "8GiB"}}, "execution.max_memory: gpu0: expected a GPU index or cpu"),
    ({"device_map": "auto", "max_memory": {0: "lots"}}, "execution.max_memory: 0: expected a size like 8GiB"),
    ({"device_map": "auto", "pipeline": "sequential"}, "execution: device_map auto spreads the whole model .* drop one of them"),
    ({"device_map": "auto", "device": "cpu"}, "execution: device_map auto chooses the devices itself: drop device cpu"),
])
def test_placements_that_cannot_work_are_refused_in_the_recipe(execution, message):
    with pytest.raises(UserError, match=message):
        Recipe.from_dict({**RECIPE, "execution": execution})


def test_max_memory_keys_mean_the_same_from_yaml_and_json():
    recipe = Recipe.from_dict({**RECIPE, "execution": {"device_map": "auto", "max_memory": {0: "70GiB", "cpu": 8 << 30}}})
    assert recipe.execution.max_memory == {"0": "70GiB", "cpu": 8 << 30}
    assert Recipe.from_dict(recipe.to_dict()).execution == recipe.execution


def test_device_map_is_refused_for_a_model_accelerate_does_not_load(tiny_clip):
    for spec in (tiny_clip, build_tiny("open-clip").model):
        with pytest.raises(UserError, match="execution.device_map auto loads a transformers model folder through accelerate"):
            run(spec if isinstance(spec, torch.nn.Module) else str(spec),
                Recipe.from_dict({**RECIPE, "execution": {"device_map": "auto"}}), progress=False)


# --- the CPU, explicitly or by default, changes nothing ------------------------------------
@pytest.mark.parametrize("pipeline_name", ["in_memory", "sequential"])
def test_device_cpu_writes_the_default_folder_bit_for_bit(tiny_clip, tmp_path, pipeline_name):
    default, out = cli_quantize(tiny_clip, tmp_path, "default", "--pipeline", pipeline_name)
    explicit, cpu_out = cli_quantize(tiny_clip, tmp_path, "cpu", "--pipeline", pipeline_name, "--device", "cpu")
    assert default == explicit == 0
    assert_same_weights(weights_of(out), weights_of(cpu_out))
    reports = [json.loads((folder / "report.json").read_text()) for folder in (out, cpu_out)]
    assert reports[0]["fidelity"] == reports[1]["fidelity"]
    assert reports[0]["execution"] == reports[1]["execution"] == {"pipeline": pipeline_name, "device": "cpu"}


def test_sequential_on_the_cpu_leaves_the_blocks_where_they_are(tiny_clip):
    """No copy: the blocks of a model sequential passes run on the CPU are the loaded tensors."""
    adapter = resolve(str(tiny_clip))
    before = {name: tensor.data_ptr() for name, tensor in adapter.model.state_dict().items()}
    loaded = pipeline.load(adapter.model, Recipe.from_dict({**RECIPE, "execution": {"pipeline": "sequential"}}), [])
    assert {name: tensor.data_ptr() for name, tensor in loaded.model.state_dict().items()} == before
    assert "streamed_weights" not in loaded.__dict__


def test_blocks_hosted_for_an_accelerator_run_the_same_pass(tiny_clip):
    """What a sequential pass on a GPU does with the blocks (each brought for its turn, and for
    each call of a whole-model forward), with the CPU standing in for the GPU: the moves are then
    no-ops, the bookkeeping is not. Same statistics and quantized weights as the plain pass."""
    def hosted():
        adapter = resolve(str(tiny_clip))
        adapter.__dict__[STREAMED_ATTRIBUTE] = HostedBlocks(adapter.model, adapter.block_names(), "cpu")
        return adapter

    inputs = batches(resolve(str(tiny_clip)))
    results = []
    for adapter in (resolve(str(tiny_clip)), hosted()):
        embedding = adapter.embed(inputs[0])  # a whole-model forward: each hosted block comes for its call
        residence = adapter.__dict__.get(STREAMED_ATTRIBUTE)
        assert residence is None or not residence.resident  # and went back after it
        quantizer = QUANTIZERS.get("fake")(QuantizationConfig.model_validate(W8A8))
        calibration = calibrate(adapter, quantizer, inputs, progress=False, execution=ExecutionConfig(pipeline="sequential"))
        make_resident(adapter, quantizer.freeze)
        pipeline.quantize(adapter, quantizer, calibration)
        results.append((calibration.stats.summary(), adapter.model.state_dict(), embedding))
    assert torch.equal(results[0][2], results[1][2])
    assert results[0][0] == results[1][0]
    assert_same_weights(results[0][1], results[1][1])


# --- accelerate ------------------------------------------------------------------------------
def test_device_map_auto_loads_through_accelerate_and_writes_the_plain_folder(hf_clip_folder, tmp_path):
    plain, out = cli_quantize(hf_clip_folder, tmp_path, "plain")
    mapped, mapped_out = cli_quantize(hf_clip_folder, tmp_path, "mapped", "--device-map", "auto")
    assert plain == mapped == 0
    assert_same_weights(weights_of(out), weights_of(mapped_out))
    report = json.loads((mapped_out / "report.json").read_text())
    # one device here, so accelerate puts the whole model on it and attaches no hooks
    assert report["execution"] == {"pipeline": "in_memory", "device": "cpu", "device_map": {"": "cpu"}}


def test_max_memory_that_would_offload_to_disk_is_refused_before_any_weight_is_read(hf_clip_folder, monkeypatch):
    def must_not_load(*_args, **_kwargs):
        raise AssertionError("weights were read before the device map was checked")

    monkeypatch.setattr(hf_models, "_load_weights", must_not_load)
    recipe = Recipe.from_dict({**RECIPE, "execution": {"device_map": "auto", "max_memory": {"cpu": "64KiB"}}})
    with pytest.raises(UserError, match=r"does not fit within max_memory \{'cpu': '64KiB'\}, and accelerate would offload "
                                        r"\d+ of its modules .* to disk.* use pipeline: sequential with offload_dir"):
        run(str(hf_clip_folder), recipe, progress=False)


def test_accelerate_hooks_survive_the_quantizers_module_replacement():
    """accelerate's dispatch over several devices hooks the modules of its device map; one of
    them here is a Linear the quantizer replaces (the projection). Forced onto one device, the
    hooks are the ones several GPUs get, and the folder is the plain model's."""
    plain = run(build_tiny("hf-clip").model, Recipe.from_dict(RECIPE), progress=False)[0].adapter.model
    model = build_tiny("hf-clip").model
    dispatch_model(model, device_map={"vision_model.embeddings": "cpu", "vision_model.pre_layrnorm": "cpu",
                                      "vision_model.encoder": "cpu", "vision_model.post_layernorm": "cpu",
                                      "visual_projection": "cpu"}, force_hooks=True)
    calls = []
    hook = model.visual_projection._hf_hook
    original = hook.pre_forward
    hook.pre_forward = lambda module, *args, **kwargs: (calls.append(type(module)), original(module, *args, **kwargs))[1]
    quantized = run(model, Recipe.from_dict(RECIPE), progress=False)[0].adapter.model
    assert isinstance(quantized.visual_projection, FakeQuantLinear) and quantized.visual_projection._hf_hook is hook
    assert FakeQuantLinear in calls  # the hook moved the quantized projection's inputs
    assert_same_weights(plain.state_dict(), quantized.state_dict())


# --- no tensor made without a device ----------------------------------------------------------
@contextlib.contextmanager
def no_tensor_without_a_device():
    """Tensors created without a device go to meta: one that meets the model's tensors fails the
    op, one that reaches a number (.item()) fails there, and one that ends in a result makes it
    differ from the plain run's. What a GPU run would catch, caught on the CPU."""
    with torch.device("meta"):
        yield


def batches(adapter, count=8):
    samples = load_samples("bundled", adapter.modality, count, 4, 0, 24 if adapter.modality == "text" else None)
    return [adapter.preprocess(samples.calibration[i:i + 4], max_length=24) for i in range(0, count, 4)]


def calibrated(adapter, execution, inputs, probe, guarded):
    adapter.probe_inputs = lambda: probe  # preprocessing builds CPU tensors from images by design
    quantizer = QUANTIZERS.get("fake")(QuantizationConfig.model_validate(W8A8))
    with no_tensor_without_a_device() if guarded else contextlib.nullcontext():
        calibration = calibrate(adapter, quantizer, inputs, progress=False, execution=execution)
        pipeline.quantize(adapter, quantizer, calibration)
        summary = calibration.stats.summary()
    return summary, adapter.model.state_dict()


@pytest.mark.parametrize("build", [lambda: build_tiny("hf-clip"), lambda: build_tiny("open-clip"),
                                   lambda: build_tiny("timm-vit"), lambda: build_tiny_causal_lm("llama")],
                         ids=["hf-clip", "open-clip", "timm-vit", "llama"])
@pytest.mark.parametrize("pipeline_name", ["in_memory", "sequential"])
def test_calibration_makes_no_tensor_without_a_device(build, pipeline_name):
    adapter = build()
    inputs, probe = batches(adapter), adapter.probe_inputs()
    reference = calibrated(build(), ExecutionConfig(), inputs, probe, guarded=False)
    summary, state = calibrated(adapter, ExecutionConfig(pipeline=pipeline_name), inputs, probe, guarded=True)
    assert summary == reference[0]
    assert_same_weights(reference[1], state)


def test_the_methods_make_no_tensor_without_a_device(tmp_path, monkeypatch):
    """As run applies them: RegCache's profile, search, registers and install; KVSink's profile and
    cache; static KV scales; smoothquant and sink-tokens."""
    recipes = {
        "clip": (build_planted_clip(), {**RECIPE, "calibration": {"num_samples": 16, "batch_size": 4, "holdout": 4},
                                        "methods": [{"regcache": {"candidate_top_k": 8}}]}),
        "llama": (str(save_planted_llama(tmp_path / "llama")), {
            **RECIPE, "calibration": {"num_samples": 8, "batch_size": 4, "holdout": 2, "seq_len": 32},
            "quantization": None, "kv_cache": {"backend": "quantsink", "bits": 4, "sinks": {"method": "kvsink", "num_sinks": 2}}}),
        "llama static": (str(tmp_path / "llama"), {
            **RECIPE, "calibration": {"num_samples": 8, "batch_size": 4, "holdout": 2, "seq_len": 32},
            "kv_cache": {"bits": 8, "type": "float", "scales": "static", "keys": {"granularity": "per_tensor"},
                         "values": {"granularity": "per_tensor"}, "sinks": {"method": "pfn", "num_sinks": 2}}}),
        "minilm": ("all-minilm-l6-v2", {
            **RECIPE, "calibration": {"num_samples": 8, "batch_size": 4, "holdout": 4, "seq_len": 32},
            "methods": [{"smoothquant": {"alpha": 0.8}}, {"sink-tokens": {"outlier_ratio": 3.0}}]}),
    }
    for spec, recipe in recipes.values():
        recipe = Recipe.from_dict(recipe)
        reference, _ = run(copy.deepcopy(spec) if isinstance(spec, torch.nn.Module) else spec, recipe, progress=False)
        adapter = resolve(spec)
        splits, probe = pipeline.data(adapter, recipe.calibration), adapter.probe_inputs()
        with monkeypatch.context() as patched:  # loading and preprocessing build CPU tensors by design
            patched.setattr(pipeline, "resolve", lambda *_args, **_kwargs: adapter)
            patched.setattr(pipeline, "data", lambda *_args: splits)
            patched.setattr(type(adapter), "probe_inputs", lambda _self: probe)
            with no_tensor_without_a_device():
                guarded, _ = run(adapter.model, recipe, progress=False)
        assert guarded.report.get("kv_cache") == reference.report.get("kv_cache")
        assert guarded.report.get("fidelity") == reference.report.get("fidelity")
        states = [{method.name: method.state() for method in artifact.methods} for artifact in (reference, guarded)]
        for name, (settings, tensors) in states[0].items():
            other_settings, other_tensors = states[1][name]
            for report in (settings.get("report", {}), other_settings.get("report", {})):
                report.pop("cost", None)  # seconds
            assert settings == other_settings
            assert_same_weights(tensors, other_tensors)


# --- on a GPU (skipped without one) -------------------------------------------------------------
def cuda_calibrated(build, execution):
    adapter = build()
    if execution.pipeline == "in_memory":
        adapter.model.to(distributed.device_for(execution.device))
    else:
        host_blocks(adapter, distributed.device_for(execution.device))
    inputs = [on_device(batch, adapter.input_device) for batch in batches(adapter)]
    quantizer = QUANTIZERS.get("fake")(QuantizationConfig.model_validate(W8A8))
    calibration = calibrate(adapter, quantizer, inputs, progress=False, execution=execution)
    make_resident(adapter, quantizer.freeze)
    pipeline.quantize(adapter, quantizer, calibration)
    return {name: tensor.cpu() for name, tensor in adapter.model.state_dict().items()}


@needs_gpu
@pytest.mark.parametrize("pipeline_name", ["in_memory", "sequential"])
@pytest.mark.parametrize("family", ["hf-clip", "llama"])
def test_cuda_gives_the_cpu_qparams_within_float_tolerance(family, pipeline_name):
    build = (lambda: build_tiny_causal_lm("llama")) if family == "llama" else (lambda: build_tiny(family))
    cpu = cuda_calibrated(build, ExecutionConfig(device="cpu", pipeline=pipeline_name))
    cuda = cuda_calibrated(build, ExecutionConfig(device="cuda", pipeline=pipeline_name))
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        assert torch.allclose(cpu[name].float(), cuda[name].float(), rtol=1e-3, atol=1e-5), name


@needs_gpu
def test_sequential_on_cuda_keeps_the_blocks_on_the_cpu_between_turns(tiny_clip, tmp_path):
    adapter = pipeline.load(str(tiny_clip), Recipe.from_dict({**RECIPE, "execution": {"pipeline": "sequential",
                                                                                         "device": "cuda"}}), [])
    assert adapter.input_device.type == "cuda"
    assert all(tensor.device.type == "cpu" for block in adapter.blocks() for tensor in block.state_dict().values())
    code, out = cli_quantize(tiny_clip, tmp_path, "cuda-seq", "--pipeline", "sequential", "--device", "cuda")
    assert code == 0
    _, cpu_out = cli_quantize(tiny_clip, tmp_path, "cpu-seq", "--pipeline", "sequential", "--device", "cpu")
    cuda_weights, cpu_weights = weights_of(out), weights_of(cpu_out)
    for name in cpu_weights:
        assert torch.allclose(cuda_weights[name].float(), cpu_weights[name].float(), rtol=1e-3, atol=1e-5), name


@needs_gpu
def test_device_map_auto_on_a_gpu_writes_the_cpu_folder(hf_clip_folder, tmp_path):
    code, out = cli_quantize(hf_clip_folder, tmp_path, "gpu", "--device-map", "auto")
    _, cpu_out = cli_quantize(hf_clip_folder, tmp_path, "cpu", "--device", "cpu")
    assert code == 0
    gpu_weights, cpu_weights = weights_of(out), weights_of(cpu_out)
    for name in cpu_weights:
        assert torch.allclose(gpu_weights[name].float(), cpu_weights[name].float(), rtol=1e-3, atol=1e-5), name
