"""Stopping processes (test servers, workers, operators): SIGTERM, then SIGKILL after a grace period.

``stop_process`` is the one way tests, benchmarks and tools stop a process they started.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> int | None:
    """Terminate ``proc`` if it still runs; kill it if it ignores SIGTERM for ``grace`` seconds.

    Returns its exit code (negative: the signal that ended it; None for no process), so a test
    can assert a graceful exit: ``assert stop_process(proc, 20) == 0``.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ServerProcess:
    """Lifecycle shared by the test servers: one process (``proc``) and a scratch dir (``dir``)."""

    proc: subprocess.Popen | None
    dir: Path

    def start(self) -> ServerProcess:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
