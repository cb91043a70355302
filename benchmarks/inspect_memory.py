"""Peak memory of `quantsink inspect` at two sample counts: the inspection pass reduces every
batch in its hooks (quantsink.inspection.collect), so what the pass adds to the process's peak
should not grow with the number of samples; only the raw samples, which load_samples holds,
do. Each run is a fresh process: its peak RSS (ru_maxrss) after loading the model and the
samples, and after the whole inspection (pass, sensitivity, figures, report).

    python benchmarks/inspect_memory.py [--counts 32 256] [--models planted-clip sink-lm] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, tempfile, pathlib
import torch
torch.set_num_threads(int(sys.argv[3]))
from quantsink.data import load_samples
from quantsink.inspection.run import inspect, LLM_SEQ_LEN
from quantsink.models import resolve
name, count = sys.argv[1], int(sys.argv[2])
if name == "planted-clip":
    from quantsink.testing.planted_clip import build_planted_clip
    model = resolve(build_planted_clip())
else:
    model = resolve(name)
text = model.modality == "text"
load_samples("bundled", model.modality, count, 0, 0, LLM_SEQ_LEN if text else None)  # what inspect loads, to measure it
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
inspection = inspect(model, num_samples=count, progress=False)
with tempfile.TemporaryDirectory() as folder:
    inspection.save(pathlib.Path(folder) / "out")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"model": name, "samples": inspection.data["calibration"]["samples"], "loaded_mb": loaded / 1024,
                  "peak_mb": peak / 1024}))
"""

MODELS = ("planted-clip", "sink-lm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=(32, 256))
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="planted-clip or a model spec")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for model in args.models:
        for count in args.counts:
            completed = subprocess.run([sys.executable, "-c", CHILD, model, str(count), str(args.threads)],
                                       capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    print("| model | samples | peak RSS after loading model and samples (MB) | peak RSS of the inspection (MB) | added by the inspection (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['samples']} | {row['loaded_mb']:.0f} | {row['peak_mb']:.0f} | "
              f"{row['peak_mb'] - row['loaded_mb']:.0f} |")


if __name__ == "__main__":
    main()
