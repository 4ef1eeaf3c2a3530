"""keep_large_buffers: a second large message reuses the first one's memory instead of a new mapping."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys
from kiosk_worker.runner import keep_large_buffers

def big_anon_mappings():
    out = set()
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) < 6 and hi - lo >= 64 << 20:  # anonymous, at least 64 MiB
            out.add((lo, hi))
    return out

if sys.argv[1] == "keep":
    assert keep_large_buffers()
first = bytes(64 << 20)
del first
before = big_anon_mappings()
second = bytes(64 << 20)
after = big_anon_mappings()
print("new" if after - before else "reused")
"""


def _run(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_second_large_buffer_reuses_memory() -> None:
    assert _run("keep") == "reused"
    assert _run("default") == "new"  # glibc's default maps each large buffer anew: the probe can tell
