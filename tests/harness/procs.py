"""Stopping the test servers' processes: SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


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
