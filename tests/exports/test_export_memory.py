"""What an export copies: the tensors go to safetensors as they are (only entries sharing
storage are copied), an int8 backend's codes are written from its own layers, and the
per-layer views are built one layer at a time."""
import torch

import quantsink
from quantsink import io
from quantsink.quantizers import fake as fake_backend
from quantsink.quantizers.int8 import Int8Linear

from int8_helpers import write_recipe


def capture_saved(monkeypatch) -> dict:
    saved = {}
    real = io.save_file

    def save_file(tensors, path):
        saved.update(tensors)
        real(tensors, path)

    monkeypatch.setattr(io, "save_file", save_file)
    return saved


def test_save_tensors_copies_only_what_shares_storage_or_is_strided(tmp_path, monkeypatch):
    saved = capture_saved(monkeypatch)
    weight, halves, strided = torch.randn(4, 4), torch.randn(8, 4), torch.randn(4, 4).t()
    tensors = {"weight": weight, "tied": weight, "upper": halves[:4], "lower": halves[4:], "strided": strided}
    io.save_tensors(tensors, tmp_path / "model.safetensors")

    assert saved["weight"].data_ptr() == weight.data_ptr()  # written from its own storage
    assert saved["upper"].data_ptr() == halves.data_ptr()
    # tied weights and views of one storage: saved once per name, so copied
    assert saved["tied"].data_ptr() != weight.data_ptr()
    assert saved["lower"].untyped_storage().data_ptr() != halves.untyped_storage().data_ptr()
    assert saved["strided"].is_contiguous()
    loaded = io.load_tensors(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_the_int8_export_writes_each_int8_layers_own_codes(tiny_clip, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, {"backend": "int8"}, "int8")
    result = quantsink.quantize(str(tiny_clip), recipe, progress=False)
    layers = {name: module for name, module in result.model.named_modules() if isinstance(module, Int8Linear)}
    assert layers
    saved = capture_saved(monkeypatch)
    result.save(tmp_path / "out")
    for name, module in layers.items():
        assert saved[f"{name}.weight"].dtype == torch.int8
        assert saved[f"{name}.weight"].data_ptr() == module.weight.data_ptr()


def test_the_views_of_a_float_backend_are_computed_per_layer_when_read(tiny_clip, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, {"backend": "fake"}, "int8")
    result = quantsink.quantize(str(tiny_clip), recipe, progress=False)
    computed = []
    real = fake_backend.grid_weight
    monkeypatch.setattr(fake_backend, "grid_weight", lambda module: computed.append(module) or real(module))

    linears = result.artifact.quantized_linears()
    names = list(linears)
    assert len(linears) == result.report["quantized_modules"] == len(names) and computed == []
    first = linears[names[0]]
    assert len(computed) == 1 and first.weight.dtype == torch.int32
    assert torch.equal(first.weight, real(result.model.get_submodule(names[0])))
