"""A real redis-server on a loopback port, one per test session (or per test when asked)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from harness.ports import free_port
from harness.procs import stop_process


class RedisServer:
    """Start/stop/restart a redis-server process; data dir survives restarts (AOF optional)."""

    def __init__(self, appendonly: bool = False, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if not self.binary:
            raise RuntimeError("redis-server not found: run `make deps` (apt-get install redis-server)")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kiosk-redis-"))
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, **kwargs)

    def start(self) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always", "--protected-mode", "no",
        ]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        probe = self.client(socket_timeout=0.5)
        while True:
            try:
                if probe.ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_tail = (self.dir / "redis.log").read_text()[-500:]
                raise RuntimeError(f"redis-server failed to start: {log_tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """Worker environment pointing at this server."""
        return {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(self.port)}


