"""Local-mode pools for tests: a pool YAML, tiny inputs, and the local operator as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import tifffile
import yaml

import kiosk_protocol as protocol

QUEUE = "segmentation"


def write_pool(path: Path, name: str, redis_port: int, model_port: int, bucket: Path,
               worker: dict[str, Any] | None = None, **scaling: Any) -> Path:
    """A ConsumerPool YAML for local mode; ``scaling`` keys are the CRD's camelCase names."""
    spec_scaling = {"minWorkers": 0, "maxWorkers": 3, "itemsPerWorker": 5,
                    "pollingIntervalSeconds": 0.2, "cooldownSeconds": 1}
    spec_scaling.update(scaling)
    doc = {
        "apiVersion": "kiosk.deepcell.org/v1alpha1",
        "kind": "ConsumerPool",
        "metadata": {"name": name},
        "spec": {
            "queues": [QUEUE],
            "consumerType": "segmentation",
            "worker": {"image": "local", "heartbeatIntervalSeconds": 0.3, "graceSeconds": 5,
                       "terminationGracePeriodSeconds": 10, **(worker or {})},
            "redis": {"host": "127.0.0.1", "port": redis_port},
            "modelServer": {"host": "127.0.0.1", "port": model_port},
            "storage": {"bucket": f"file://{bucket}"},
            "scaling": spec_scaling,
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def tiny_input(bucket: Path, name: str = "tiny.tif", size: int = 16, bad: bool = False) -> str:
    """A small image in the bucket (or, with ``bad``, a file that is not an image)."""
    bucket.mkdir(parents=True, exist_ok=True)
    if bad:
        (bucket / name).write_bytes(b"this is not an image")
    else:
        image = (np.arange(size * size, dtype=np.float32).reshape(size, size) % 7) / 7
        tifffile.imwrite(bucket / name, image)
    return name


def submit_many(client: redis.Redis, name: str, n: int, model: str = "null") -> list[str]:
    pipe_keys = []
    for _ in range(n):
        pipe_keys.append(protocol.submit_job(client, QUEUE, name, model, "1"))
    return pipe_keys


def statuses(client: redis.Redis, keys: Iterable[str]) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, "status")
    return [s.decode() if isinstance(s, bytes) else s for s in pipe.execute()]


def all_finished(client: redis.Redis, keys: list[str]) -> bool:
    return all(s in protocol.FINISHED_STATUSES for s in statuses(client, keys))


def processing_lists(client: redis.Redis) -> dict[str, int]:
    """Every processing list of the queue (tests only: SCAN is fine here)."""
    return {k: client.llen(k) for k in client.scan_iter(match=f"processing-{QUEUE}:*")}


class LocalOperator:
    """``python -m kiosk_operator.local`` as a subprocess with its output in a file."""

    def __init__(self, pool_file: Path, state_dir: Path, *extra: str) -> None:
        self.args = [sys.executable, "-m", "kiosk_operator.local", "-f", str(pool_file),
                     "--state-dir", str(state_dir), "--plain", "--model-server", "no", *extra]
        self.log = state_dir.parent / f"{state_dir.name}-operator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalOperator:
        out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: its workers keep running, like pods when an operator pod dies."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


def worker_counts(output: str) -> list[int]:
    """The workers= figures of the operator's progress lines, in order."""
    counts = []
    for line in output.splitlines():
        for word in line.split():
            if word.startswith("workers="):
                counts.append(int(word.split("=", 1)[1]))
    return counts
