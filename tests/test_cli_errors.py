"""Bad input: exit status 2, one line naming the cause, and no output folder left behind."""
import os
import subprocess
import sys

import pytest

from quantsink import cli


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantsink.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(completed, *fragments):
    assert completed.returncode == 2, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.startswith("quantsink: error:")]
    assert len(lines) == 1, completed.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def good_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ncalibration: {num_samples: 4, holdout: 2, batch_size: 2}\n")
    return path


@pytest.mark.slow
def test_malformed_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("quantization:\n  activations: {bits: nine}\n")
    completed = run_cli("quantize", "all-minilm-l6-v2", str(recipe), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(completed, "quantization.activations.bits: expected an integer 2-8, got 'nine'")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unknown_model_suggests_close_names(tmp_path, good_recipe):
    completed = run_cli("quantize", "clip-vit-l14", str(good_recipe), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(completed, "clip-vit-l")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_uncached_hub_id_says_how_to_fix(tmp_path, good_recipe):
    completed = run_cli("quantize", "hf:openai/clip-vit-large-patch14", str(good_recipe), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(completed, "local folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_empty_calibration_folder(tmp_path, good_recipe):
    empty = tmp_path / "images"
    empty.mkdir()
    completed = run_cli("quantize", "all-minilm-l6-v2", str(good_recipe), "--calib", str(empty), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(completed, str(empty))
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_existing_output_is_not_overwritten(tmp_path, good_recipe, capsys):
    (tmp_path / "out").mkdir()
    assert cli.main(["quantize", "all-minilm-l6-v2", str(good_recipe), "-o", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_failure_midway_leaves_no_output(tmp_path, good_recipe, monkeypatch):
    from quantsink.exports import folder as export

    def explode(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.io, "write_json", explode)
    assert cli.main(["quantize", "all-minilm-l6-v2", str(good_recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 130
    assert list(tmp_path.iterdir()) == [good_recipe]


def test_models_lists_every_short_name(capsys):
    assert cli.main(["models"]) == 0
    listing = capsys.readouterr().out
    for name, source in [("clip-vit-l", "hf:openai/clip-vit-large-patch14"), ("openclip-vit-h14", "open_clip:ViT-H-14"),
                         ("siglip2-b16", "hf:google/siglip2-base-patch16-224"), ("dinov2-l", "hf:facebook/dinov2-large")]:
        assert any(name in line.split() and source in line for line in listing.splitlines())


# --- output folders that cannot be created: exit 2, one line, nothing left, nothing calibrated ----

@pytest.fixture
def no_calibration(monkeypatch):
    """Fails the test if quantize() is reached: an unwritable output must be refused before."""
    from quantsink import api

    def refuse(*_args, **_kwargs):
        raise AssertionError("calibration started although the output folder cannot be created")

    monkeypatch.setattr(api, "quantize", refuse)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantsink: error: "), lines
    return lines[0]


@pytest.mark.parametrize("below", ["out", "a/b/out"])
def test_output_under_a_file_is_refused_before_calibration(tmp_path, good_recipe, capsys, no_calibration, below):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder\n")
    assert cli.main(["quantize", "all-minilm-l6-v2", str(good_recipe), "-o", str(blocker / below), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"cannot create output folder {blocker / below}" in line
    assert f"{blocker} is a file, not a folder" in line and "-o" in line
    assert sorted(tmp_path.iterdir()) == sorted([good_recipe, blocker])
    assert blocker.read_text() == "not a folder\n"


def test_output_on_a_file_system_that_refuses_folders(tmp_path, good_recipe, capsys, no_calibration):
    target = f"/proc/quantsink-test-{os.getpid()}/out"
    assert cli.main(["quantize", "all-minilm-l6-v2", str(good_recipe), "-o", target, "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"cannot create output folder {target}" in line and "-o" in line
    assert not os.path.exists(os.path.dirname(target))


def test_output_without_permission_leaves_no_parents_behind(tmp_path, good_recipe, capsys, no_calibration, monkeypatch):
    import errno
    import tempfile

    def denied(*_args, dir=None, **_kwargs):  # what a folder root cannot write to does (tests run as root)
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    target = tmp_path / "new" / "nested" / "out"
    assert cli.main(["quantize", "all-minilm-l6-v2", str(good_recipe), "-o", str(target), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "Permission denied" in line and "a folder you can write to" in line
    assert list(tmp_path.iterdir()) == [good_recipe]


@pytest.mark.slow
def test_a_disk_that_fills_up_while_writing_is_one_line_and_leaves_nothing(tmp_path, good_recipe, capsys, monkeypatch):
    import errno

    from quantsink import io

    def disk_full(_tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "save_tensors", disk_full)
    assert cli.main(["quantize", "all-minilm-l6-v2", str(good_recipe), "-o", str(tmp_path / "deep" / "out"), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "nothing was written" in line
    assert list(tmp_path.iterdir()) == [good_recipe]


@pytest.mark.slow
def test_the_console_reports_an_output_under_a_file_in_one_line(tmp_path, good_recipe):
    blocker = tmp_path / "file"
    blocker.write_text("")
    completed = run_cli("quantize", "all-minilm-l6-v2", str(good_recipe), "-o", str(blocker / "out"), cwd=tmp_path)
    assert_one_line_error(completed, "is a file, not a folder")
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "r.yaml"]
