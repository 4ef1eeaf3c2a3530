"""Stopping the test servers' processes: SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Terminate ``proc`` if it still runs; kill it if it ignores SIGTERM for ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
