"""`quantsink inspect` from the command line: it writes the report, and bad input exits 2 with
one line naming the cause and leaves nothing behind (as `quantsink quantize` does,
tests/test_cli_errors.py)."""
import math

import pytest
import torch

import quantsink
from inspect_checks import check_saved
from quantsink import cli
from quantsink.inspection import run
from quantsink.models import save_model
from quantsink.testing.tiny import build_tiny


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quantsink: error:")]
    assert len(lines) == 1
    return lines[0]


def test_inspect_writes_every_file_and_prints_the_summary(tiny_clip, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["inspect", str(tiny_clip), "--num-samples", "8", "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "recommend  methods.regcache.sensitive_layer:" in printed and f"written    {out}" in printed
    check_saved(out, {"residual_tokens.png", "residual_patches.png", "channels.png", "attention.png", "sensitivity.png"})


@pytest.mark.parametrize("model, fragment", [("clip-vit-l14", "clip-vit-l"), ("no/such/folder", "there is no folder")])
def test_unknown_model(model, fragment, tmp_path, capsys):
    assert cli.main(["inspect", model, "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert fragment in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_missing_calibration_file(tiny_clip, tmp_path, capsys):
    missing = tmp_path / "photos"
    assert cli.main(["inspect", str(tiny_clip), "--calib", str(missing), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert str(missing) in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tiny_clip, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["inspect", str(tiny_clip), "-o", str(blocker / "out"), "--quiet"]) == 2
    assert "is a file" in one_error_line(capsys)
    (tmp_path / "taken").mkdir()
    assert cli.main(["inspect", str(tiny_clip), "-o", str(tmp_path / "taken"), "--quiet"]) == 2
    assert "already exists" in one_error_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file", "taken"]
    assert list((tmp_path / "taken").iterdir()) == []


def test_nan_activations(tmp_path, capsys):
    adapter = build_tiny("hf-clip")
    with torch.no_grad():
        adapter.fc2(1).weight[0, 0] = math.nan
    save_model(adapter, tmp_path / "broken")
    assert cli.main(["inspect", str(tmp_path / "broken"), "--num-samples", "4", "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert "non-finite activations (NaN or inf) at the output of" in one_error_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken"]


def test_quantsink_inspect_is_the_function_once_the_package_is_imported():
    assert quantsink.inspect is run.inspect and quantsink.Inspection is run.Inspection
