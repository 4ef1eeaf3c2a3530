"""Worker processes on this machine: the local-mode stand-in for a Deployment's pods.

Each worker is a ``kiosk-worker`` process with a unique name (its WORKER_NAME and
HOSTNAME, like a pod name). A pid file per worker lets a restarted local operator
adopt the workers that kept running, just as pods outlive an operator restart in
Kubernetes. Scale-down sends SIGTERM (the worker drains) to idle workers first.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_COMMAND = (sys.executable, "-m", "kiosk_worker")


@dataclass
class WorkerProcess:
    name: str
    pid: int
    popen: subprocess.Popen[bytes] | None = None
    stopping_since: float | None = None

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_running(self.pid)


@dataclass
class ProcessBackend:
    """Start, stop and find worker processes; state lives in ``state_dir``."""

    state_dir: Path
    env: Mapping[str, str]
    prefix: str = "worker"
    command: tuple[str, ...] = DEFAULT_COMMAND
    kill_after: float = 30.0
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        (self.state_dir / "workers").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.adopt()

    # -- queries --

    def alive(self, name: str) -> bool:
        """Pod lookup for reclaim: does a worker process of this name still run?"""
        worker = self.workers.get(name)
        if worker is not None:
            return worker.running()
        pid = self._read_pid(name)
        return pid is not None and pid_running(pid) and _looks_like_worker(pid)

    def active(self) -> list[str]:
        """Running workers not asked to stop: what scaling counts as current replicas."""
        self.reap()
        return [n for n, w in self.workers.items() if w.stopping_since is None]

    # -- actions --

    def start(self, count: int = 1) -> list[str]:
        names = []
        for _ in range(count):
            name = f"{self.prefix}-{secrets.token_hex(3)}"
            env = dict(os.environ)
            env.update(self.env)
            env.update(WORKER_NAME=name, HOSTNAME=name)
            logfile = open(self.state_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115
            popen = subprocess.Popen(
                list(self.command), env=env, stdout=logfile, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            logfile.close()
            self.workers[name] = WorkerProcess(name, popen.pid, popen)
            (self.state_dir / "workers" / f"{name}.pid").write_text(str(popen.pid))
            names.append(name)
        return names

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        worker = self.workers.get(name)
        if worker is None:
            return
        try:
            os.kill(worker.pid, sig)
        except ProcessLookupError:
            pass
        if worker.stopping_since is None:
            worker.stopping_since = time.monotonic()

    def scale_to(self, desired: int, busy: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """Start or stop workers to reach ``desired``; idle ones are stopped first.

        Returns (started, stopped).
        """
        active = self.active()
        if desired > len(active):
            return self.start(desired - len(active)), []
        busy = set(busy)
        extra = len(active) - desired
        # Idle first, then the newest (least likely to hold work); busy ones drain on SIGTERM.
        order = sorted(active, key=lambda n: (n in busy, -self.workers[n].pid))
        victims = order[:extra]
        for name in victims:
            self.stop(name)
        return [], victims

    def reap(self) -> list[str]:
        """Forget exited workers; SIGKILL those that ignored SIGTERM for too long."""
        gone = []
        now = time.monotonic()
        for name, worker in list(self.workers.items()):
            if not worker.running():
                gone.append(name)
                del self.workers[name]
                (self.state_dir / "workers" / f"{name}.pid").unlink(missing_ok=True)
            elif worker.stopping_since is not None and now - worker.stopping_since > self.kill_after:
                log.warning("worker %s did not exit %.0fs after SIGTERM; killing it", name, self.kill_after)
                self.stop(name, signal.SIGKILL)
        return gone

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker and wait for them to drain (SIGKILL after ``timeout``)."""
        for name in list(self.workers):
            self.stop(name)
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for name in list(self.workers):
            self.stop(name, signal.SIGKILL)
        while self.workers and time.monotonic() < deadline + 5:
            self.reap()
            time.sleep(0.05)

    def adopt(self) -> list[str]:
        """Take over workers a previous local operator started (they survive its restart)."""
        adopted = []
        for pidfile in (self.state_dir / "workers").glob("*.pid"):
            name = pidfile.stem
            pid = self._read_pid(name)
            if name in self.workers:
                continue
            if pid is not None and pid_running(pid) and _looks_like_worker(pid):
                self.workers[name] = WorkerProcess(name, pid)
                adopted.append(name)
            else:
                pidfile.unlink(missing_ok=True)
        return adopted

    def _read_pid(self, name: str) -> int | None:
        try:
            return int((self.state_dir / "workers" / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None


def pid_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _looks_like_worker(pid: int) -> bool:
    """Guard against pid reuse when adopting: the command line must be a kiosk worker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"kiosk" in cmdline
