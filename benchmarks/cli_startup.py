"""Start-up of the CLI: wall time of `quantsink --help` and `quantsink models` (median of a few
runs, each a fresh process, as a user types them), which heavy modules each imports, and
whatever each prints on stderr (nothing, when all is well).

    python benchmarks/cli_startup.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["models"], ["models", "--quiet"])
# imported by neither command: each costs a second or more, and torchao and quanto warn
HEAVY = ("torch", "transformers", "torch.ao.quantization", "torchao", "optimum.quanto", "open_clip", "timm")

# runs the CLI in this process, then says which of HEAVY it imported (on the real stdout, last line)
PROBE = """
import json, sys
from quantsink.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps([name for name in {heavy!r} if name in sys.modules]))
"""


def executable() -> list[str]:
    """The `quantsink` console script beside this interpreter (what a user runs), else `-m`."""
    script = Path(sys.executable).with_name("quantsink")
    if script.is_file():
        return [str(script)]
    found = shutil.which("quantsink")
    return [found] if found else [sys.executable, "-m", "quantsink.cli"]


def measure(args: list[str], runs: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    seconds, stderr = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        completed = subprocess.run([*executable(), *args], capture_output=True, text=True, env=env, timeout=120)
        seconds.append(time.perf_counter() - started)
        stderr = stderr or completed.stderr
        if completed.returncode != 0:
            raise SystemExit(f"quantsink {' '.join(args)} exited {completed.returncode}: {completed.stderr.strip()}")
    probe = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                           capture_output=True, text=True, env=env, timeout=120)
    heavy = json.loads(probe.stdout.strip().splitlines()[-1])
    return {"median": statistics.median(seconds), "min": min(seconds), "heavy": heavy, "stderr": stderr.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    runs = parser.parse_args().runs
    print(f"{' '.join(executable())}, {runs} runs each, Python {sys.version.split()[0]}")
    print(f"{'command':<28}{'median s':>9}{'min s':>8}  heavy modules imported / stderr")
    for args in COMMANDS:
        result = measure(args, runs)
        heavy = ", ".join(result["heavy"]) or "none"
        print(f"{'quantsink ' + ' '.join(args):<28}{result['median']:>9.2f}{result['min']:>8.2f}  {heavy}")
        print(f"{'':<47}stderr: {result['stderr'] or '(empty)'}")


if __name__ == "__main__":
    main()
