"""quantsink.memory: glibc's heap during calibration. Each case runs in a child process, because
the mmap threshold is a setting of the whole process, with plain malloc/free (no torch): the
child frees a block the size of a forward's activation after glibc has raised its thresholds."""
import json
import subprocess
import sys
import textwrap

import pytest

from quantsink import memory

pytestmark = pytest.mark.skipif(memory._GLIBC is None, reason="glibc's allocator only")

CHILD = textwrap.dedent("""
    import ctypes, json, sys
    from quantsink import memory

    def resident_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    fixed = sys.argv[1] == "fixed" and memory.keep_large_allocations_mapped()
    MiB = 1 << 20
    # freeing a mapped block of 30 MiB raises glibc's dynamic mmap threshold to 30 MiB and its
    # trim threshold to 60 MiB
    first = libc.malloc(30 * MiB); ctypes.memset(first, 1, 30 * MiB); libc.free(first)
    before = resident_mb()
    block = libc.malloc(24 * MiB)
    ctypes.memset(block, 1, 24 * MiB)  # touched, as a tensor's pages are
    libc.free(block)
    grown = resident_mb() - before
    trimmed = memory.return_freed_memory()
    print(json.dumps({"fixed": bool(fixed), "grown_mb": grown, "after_trim_mb": resident_mb() - before, "trimmed": trimmed}))
""")


def run_child(allocator: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", CHILD, allocator], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def test_glibcs_dynamic_threshold_keeps_freed_blocks_resident_and_trim_returns_them():
    dynamic = run_child("dynamic")
    # the 24 MiB block came from the heap, and its freed pages stayed with the process
    assert dynamic["grown_mb"] > 20
    assert dynamic["trimmed"] is True and dynamic["after_trim_mb"] < 4


def test_a_fixed_threshold_returns_every_large_block_when_freed():
    fixed = run_child("fixed")
    assert fixed["fixed"] is True
    assert fixed["grown_mb"] < 4


def test_the_cli_fixes_the_threshold_for_its_process(monkeypatch):
    from quantsink import cli

    calls = []
    monkeypatch.setattr(cli, "keep_large_allocations_mapped", lambda: calls.append(True) or True)
    assert cli.main(["models"]) == 0
    assert calls == [True]


def test_without_glibc_both_say_they_did_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_GLIBC", None)
    assert memory.keep_large_allocations_mapped() is False
    assert memory.return_freed_memory() is False

