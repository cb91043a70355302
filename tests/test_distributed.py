"""Data-parallel calibration (quantsink.distributed): `torchrun --nproc-per-node 2 -m quantsink
quantize` writes the folder one process writes, bit for bit (quantized weights and static input
scales, RegCache's registers, KVSink's profile), rank 0 alone writes it, and what cannot be
sharded or merged exactly is refused in one line.

Both runs are subprocesses with one thread each: torchrun gives each rank one, and the thread
count changes float results."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from quantsink import distributed
from quantsink.calibration import ActivationStats
from quantsink.cli import main
from quantsink.models import resolve, save_model
from quantsink.registry import OBSERVERS
from quantsink.testing.planted_clip import build_planted_clip
from quantsink.testing.planted_llm import save_planted_llama
from quantsink.testing.tiny import build_tiny

CLIP = {
    "name": "ddp-clip",
    "calibration": {"data": "bundled", "num_samples": 16, "batch_size": 4, "seed": 0, "holdout": 4},
    "methods": [{"regcache": {"candidate_top_k": 8}}],  # every field searched
    "quantization": {"backend": "fake", "targets": ["Linear"], "weights": {"bits": 8},
                     # mse keeps per-batch subsamples: the merge must keep their order
                     "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False, "observer": "mse"}},
}
LLAMA = {
    "name": "ddp-llama",
    # 5 batches over 2 ranks: shards of 3 and 2
    "calibration": {"data": "bundled", "num_samples": 10, "batch_size": 2, "seed": 0, "holdout": 2, "seq_len": 64},
    "execution": {"pipeline": "sequential"},
    "kv_cache": {"backend": "quantsink", "bits": 2, "keys": {"granularity": "per_channel", "pre_rope": False},
                 "values": {"granularity": "per_token"}, "group_size": 16, "residual_length": 0,
                 "outlier_fraction": 0.0, "sinks": {"method": "kvsink", "num_sinks": 5}},
    "quantization": {"backend": "fake", "targets": ["Linear"], "ignore": ["lm_head"], "weights": {"bits": 8},
                     "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False, "observer": "percentile"}},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_model(resolve(build_planted_clip()), folder / "clip")
    save_planted_llama(folder / "llama")
    save_model(build_tiny("hf-clip"), folder / "tiny-clip")
    return folder


def start(model: Path, recipe: dict, workdir: Path, ranks: int) -> subprocess.Popen:
    """`quantsink quantize MODEL RECIPE -o runs/out` in `workdir`, in one process or under torchrun."""
    workdir.mkdir()
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"] if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, *launcher, "-m", "quantsink", "quantize", str(model), "recipe.yaml", "-o", "runs/out", "--quiet"]
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def method_states(out: Path) -> list[dict]:
    """The methods' state in quantsink.json, without the seconds their search took."""
    methods = json.loads((out / "quantsink.json").read_text())["methods"]
    for method in methods:
        method["state"].get("report", {}).pop("cost", None)
    return methods


def assert_same_tensors(path: Path, other: Path) -> int:
    tensors, others = load_file(path), load_file(other)
    assert tensors.keys() == others.keys()
    differing = [name for name in tensors if not torch.equal(tensors[name], others[name])]
    assert not differing, f"{len(differing)} of {len(tensors)} tensors of {path.name} differ, e.g. {differing[:3]}"
    return len(tensors)


def single_and_two_ranks(model: Path, recipe: dict, tmp_path: Path) -> tuple[Path, Path]:
    processes = [start(model, recipe, tmp_path / f"ranks{ranks}", ranks) for ranks in (1, 2)]  # side by side
    for completed in map(finished, processes):
        assert completed.returncode == 0, completed.stderr[-3000:]
    # rank 0 alone wrote: OUT and nothing beside it, no default out/ folder, no staging left
    assert sorted(path.name for path in (tmp_path / "ranks2").iterdir()) == ["recipe.yaml", "runs"]
    assert [path.name for path in (tmp_path / "ranks2" / "runs").iterdir()] == ["out"]
    return tmp_path / "ranks1" / "runs" / "out", tmp_path / "ranks2" / "runs" / "out"


def test_two_ranks_write_the_single_process_folder_regcache(models, tmp_path):
    single, ranks = single_and_two_ranks(models / "clip", CLIP, tmp_path)
    assert assert_same_tensors(single / "model.safetensors", ranks / "model.safetensors") > 100
    assert_same_tensors(single / "methods.safetensors", ranks / "methods.safetensors")  # the registers
    assert load_file(ranks / "methods.safetensors"), "regcache saved no register tensors"
    assert method_states(single) == method_states(ranks)
    report, other = (json.loads((out / "report.json").read_text()) for out in (single, ranks))
    assert report["fidelity"] == other["fidelity"]  # rank 0 evaluated the same model
    assert report["outliers"] == other["outliers"]  # the merged statistics


def test_two_ranks_write_the_single_process_folder_kvsink_sequential(models, tmp_path):
    """Sequential with the weights streamed from disk: the observers, merged across the ranks
    after the pass, set the scales of each block as it comes back from disk and is quantized."""
    offload = tmp_path / "offload"  # outside both runs' folders, shared: each takes a private folder in it
    recipe = {**LLAMA, "execution": {"pipeline": "sequential", "offload_dir": str(offload)}}
    single, ranks = single_and_two_ranks(models / "llama", recipe, tmp_path)
    assert not any(offload.iterdir())
    assert_same_tensors(single / "model.safetensors", ranks / "model.safetensors")
    states = method_states(ranks)
    assert states == method_states(single)
    profile = next(method["state"]["profile"] for method in states if method["name"] == "kvsink")
    assert profile["emergence_layer"] == 1 and profile["channels"], profile  # the planted sinks, found
    report, other = (json.loads((out / "report.json").read_text()) for out in (single, ranks))
    assert report["kv_cache"] == other["kv_cache"] and report["fidelity"] == other["fidelity"]


def error_lines(completed: subprocess.CompletedProcess) -> list[str]:
    """The one-line errors the ranks printed, after checking that a rank exited 2 without a
    traceback (torchrun then ends the others and exits 1 with its own report)."""
    assert completed.returncode != 0
    assert re.search(r"exitcode\s*:\s*2\b", completed.stderr), completed.stderr[-3000:]
    frames = [line for line in completed.stderr.splitlines() if line.strip().startswith("File ")]
    assert not any("quantsink" in frame for frame in frames), completed.stderr[-3000:]
    lines = [line for line in completed.stderr.splitlines() if line.startswith("quantsink: error")]
    assert lines, completed.stderr[-3000:]
    return lines


def test_fewer_batches_than_ranks_is_refused_in_one_line(models, tmp_path):
    recipe = {**LLAMA, "calibration": {**LLAMA["calibration"], "num_samples": 2}}  # one batch of 2
    lines = error_lines(finished(start(models / "llama", recipe, tmp_path / "run", 2)))
    # every rank refuses at the same point; which of them prints before torchrun ends the others
    # is a race (rank 1 first on a clean-clone CI run), so any rank's line will do, each one line
    for line in lines:
        assert "1 batches for 2 ranks" in line and "--nproc-per-node" in line and "calibration.batch_size" in line
    assert not (tmp_path / "run" / "runs").exists()


def test_a_backend_with_its_own_running_statistics_is_refused(models, tmp_path):
    recipe = {"name": "ddp-quanto", "calibration": {"data": "bundled", "num_samples": 8, "batch_size": 4, "holdout": 4},
              "quantization": {"backend": "quanto", "targets": ["Linear"],
                               "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False}}}
    for line in error_lines(finished(start(models / "tiny-clip", recipe, tmp_path / "run", 2))):
        assert "quantization.backend quanto keeps its own input statistics" in line and "one process" in line
    assert not (tmp_path / "run" / "runs").exists()


def test_commands_that_do_not_shard_are_refused_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["inspect", "tiny-clip", "-o", str(tmp_path / "out")]) == 2
    assert "quantsink inspect runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- the merges, in one process: each rank's part absorbed in rank order is the whole ---------
@pytest.mark.parametrize("name", ["minmax", "percentile", "mse"])
def test_observers_absorb_every_ranks_batches_exactly(name):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 6000, generator=generator) * (index + 1) for index in range(5)]
    whole = OBSERVERS.get(name)(8, True)
    for batch in batches:
        whole.observe(batch)
    ranks = [OBSERVERS.get(name)(8, True) for _ in range(2)]
    for observer, shard in zip(ranks, (batches[:3], batches[3:])):
        for batch in shard:
            observer.observe(batch)
    parts = [observer.accumulated() for observer in ranks]
    for observer in ranks:
        observer.absorb(parts)
        assert all(torch.equal(got, want) for got, want in zip(observer.range(), whole.range()))


def test_activation_stats_merge_samples_in_order_and_channels_by_max():
    parts = [ActivationStats(["block"], [[torch.tensor([1.0, 5.0])]], [torch.tensor([1.0, 7.0])]),
             ActivationStats(["block"], [[torch.tensor([2.0]), torch.tensor([3.0])]], [torch.tensor([4.0, 2.0])])]
    merged = ActivationStats.merged(parts)
    assert [norms.tolist() for norms in merged.token_linf[0]] == [[1.0, 5.0], [2.0], [3.0]]
    assert merged.channel_absmax[0].tolist() == [4.0, 7.0]


def test_shards_are_contiguous_whole_batches_in_rank_order(monkeypatch):
    batches = list(range(7))
    assert distributed.shard(batches) is batches  # one process: untouched
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shards.append(distributed.shard(batches))
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
