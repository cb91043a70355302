"""A quiet, light start: `quantsink --help` and `quantsink models` import no backend, no model
library (and no torch), and print nothing on stderr; the registries list every part lazily and
import a part's module only when it is looked up. Each check runs in a fresh interpreter, since
this one has imported everything already. (The wall times are in benchmarks/cli_startup.py.)"""
import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "torch.ao.quantization", "torchao", "optimum.quanto", "open_clip", "timm")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def imported_after(code: str, *args: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Which of HEAVY are in sys.modules after `code` ran (printed as its last stdout line)."""
    completed = run_python(code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))", *args)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed


CLI = """
import sys
from quantsink.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
assert status in (0, None), status
"""


@pytest.mark.parametrize("args", [["--help"], ["models"], ["models", "--quiet"], ["quantize", "--help"]])
def test_help_and_models_import_no_backend_and_print_nothing_on_stderr(args):
    imported, completed = imported_after(CLI, *args)
    assert imported == []
    assert completed.stderr == ""
    assert completed.stdout.strip()


def test_the_console_entry_prints_nothing_on_stderr():
    completed = subprocess.run([sys.executable, "-m", "quantsink.cli", "models"], capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert "openclip-vit-h14" in completed.stdout


def test_importing_quantsink_imports_nothing_heavy_until_a_name_is_used():
    imported, _ = imported_after("import quantsink\nassert 'quantize' in dir(quantsink)")
    assert imported == []
    imported, _ = imported_after("import quantsink\nquantsink.Recipe")
    assert "open_clip" not in imported and "timm" not in imported and "optimum.quanto" not in imported


def test_registries_list_lazy_parts_without_importing_them():
    code = """
import sys
from quantsink.registry import EXPORT_FORMATS, KV_CACHE_BACKENDS, METHODS, OBSERVERS, QUANTIZERS
assert QUANTIZERS.names() == ["fake", "int8", "quanto", "torchao"], QUANTIZERS.names()
assert {"regcache", "kvsink", "kv-static"} <= set(METHODS.names())
assert {"fake-quant", "int8", "compressed-tensors"} <= set(EXPORT_FORMATS.names())
assert OBSERVERS.names() == ["minmax", "mse", "percentile"]
assert {"quantsink", "transformers-quanto"} <= set(KV_CACHE_BACKENDS.names())
assert " Int8 " in QUANTIZERS and "kv_static" in METHODS and "nope" not in QUANTIZERS  # names are normalised
assert not any(name.startswith("quantsink.quantizers.") or name.startswith("quantsink.methods.") for name in sys.modules)
"""
    imported, completed = imported_after(code)
    assert imported == [], completed.stderr


def test_a_lookup_imports_only_the_part_it_names():
    code = """
import sys
from quantsink.registry import QUANTIZERS
fake = QUANTIZERS.get("fake")
assert fake.__name__ == "FakeQuantizer" and QUANTIZERS.is_loaded("fake") and not QUANTIZERS.is_loaded("torchao")
assert "quantsink.quantizers.torchao_backend" not in sys.modules and "quantsink.quantizers.quanto_backend" not in sys.modules
"""
    imported, completed = imported_after(code)
    assert "optimum.quanto" not in imported and "open_clip" not in imported, completed.stderr


def test_a_recipe_naming_a_backend_validates_without_importing_it():
    code = """
from quantsink.recipe import Recipe
Recipe.from_dict({"name": "r", "quantization": {"backend": "quanto"}, "export": {"format": "fake-quant"}})
"""
    imported, completed = imported_after(code)
    assert "optimum.quanto" not in imported, completed.stderr


@pytest.mark.slow
def test_loading_a_model_imports_only_its_own_family_library():
    code = """
import quantsink
from quantsink.models import resolve
adapter = resolve("all-minilm-l6-v2")
assert adapter.family == "hf-bert-text"
"""
    imported, completed = imported_after(code)
    assert "open_clip" not in imported and "timm" not in imported, completed.stderr
    assert "transformers" in imported


def test_importing_a_lazily_listed_module_directly_registers_without_conflict():
    from quantsink.models import adapters
    from quantsink.models.timm import TimmViTAdapter
    from quantsink.quantizers.quanto_backend import QuantoQuantizer
    from quantsink.registry import QUANTIZERS

    assert QUANTIZERS.get("quanto") is QuantoQuantizer
    assert adapters().get("timm-vit") is TimmViTAdapter


def test_lazy_entries_and_the_decorator():
    from quantsink.errors import UserError
    from quantsink.registry import Registry

    registry = Registry("widget")
    registry.register_lazy("counter", "collections:Counter", "tally")
    registry.register_lazy("counter", "collections:Counter")  # the same again: fine
    assert registry.names() == ["counter", "tally"] and not registry.is_loaded("counter")
    import collections

    assert registry.get("Counter") is collections.Counter and registry.is_loaded("counter")
    registry.register("counter")(collections.Counter)  # what the lazy entry points to: fine
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("counter")(collections.OrderedDict)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_lazy("tally", "collections:OrderedDict")
    with pytest.raises(ValueError, match="module:attr"):
        registry.register_lazy("bad", "collections")
    registry.register_lazy("missing", "quantsink_no_such_plugin_package.widgets:Widget")
    with pytest.raises(UserError, match="needs the package 'quantsink_no_such_plugin_package'"):
        registry.get("missing")
    with pytest.raises(UserError, match="did you mean counter"):
        registry.get("countr")
