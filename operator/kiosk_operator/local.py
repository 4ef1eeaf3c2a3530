"""Local mode: ``kiosk-operator --local -f POOL.yaml`` runs a pool on this machine, no cluster.

The same scaling cycle as in Kubernetes (``kiosk_operator.cycle``) drives worker
processes (``local_backend``) instead of a Deployment: they are started and stopped
with the queue depth. A local redis-server is started when the pool points at
127.0.0.1 and nothing listens there; ``kiosk-model-server`` likewise
(``--model-server``); storage is the pool's ``file://`` bucket.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from kiosk_operator import cycle, depth
from kiosk_operator.local_backend import LocalBackend
from kiosk_operator.manifests import build_worker_env, redis_tls_file_env
from kiosk_operator.process_backend import DEFAULT_COMMAND, ProcessBackend
from kiosk_operator.spec import PoolSpec, SpecError, parse_spec
from kiosk_operator.status import PoolState
from kiosk_protocol.crd import KIND
from kiosk_protocol.errors import describe

log = logging.getLogger("kiosk_operator.local")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: The namespace label of a local pool's metrics and log lines.
LOCAL_NAMESPACE = "local"
REDIS_BACKOFF_MAX = 5.0


class LocalError(RuntimeError):
    """Local mode cannot start; the message is one line for the user."""


# --- pool file ------------------------------------------------------------------------------


def load_pool(path: str | Path) -> tuple[str, PoolSpec, dict[str, Any]]:
    """The first ConsumerPool in a YAML file: (name, parsed spec, raw spec)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise LocalError(f"cannot read {path}: {err.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as err:
        raise LocalError(f"{path}: not valid YAML ({describe(err)})") from None
    pools = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not pools:
        raise LocalError(f"{path}: no document of kind {KIND}")
    doc = pools[0]
    name = str((doc.get("metadata") or {}).get("name") or "pool")
    raw = doc.get("spec") or {}
    try:
        spec = parse_spec(raw)
    except SpecError as err:
        raise LocalError(f"{path}: {err}") from None
    return name, spec, raw


def local_bucket(bucket: str, base: Path) -> str:
    """``file://relative/dir`` is resolved against ``base`` so workers agree on one directory."""
    if bucket.startswith("file://"):
        path = bucket[len("file://"):]
        if not path.startswith("/"):
            return "file://" + str((base / path).resolve())
    return bucket


def worker_env(spec: PoolSpec, base: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The pod's env from ``manifests.build_worker_env`` as plain variables for a process.

    ``valueFrom`` entries cannot be resolved without Kubernetes: the pod name is set
    by the backend, a secret must come from this process's own environment. So must the
    files of spec.redis.tlsSecretRef (mounted from a Secret in a pod).
    """
    environ = os.environ if environ is None else environ
    ref = spec.redis.tls_secret_ref
    tls_files = redis_tls_file_env(ref) if ref else {}
    env: dict[str, str] = {}
    for item in build_worker_env(spec):
        name = item["name"]
        if name in tls_files and item.get("value") == tls_files[name]:
            if not environ.get(name):
                raise LocalError(
                    f"{name}: spec.redis.tlsSecretRef names a Kubernetes Secret; "
                    "in local mode set it in the environment to the PEM file"
                )
            env[name] = environ[name]
        elif "value" in item:
            env[name] = str(item["value"])
        elif name == "WORKER_NAME":
            continue
        elif name in environ:
            env[name] = environ[name]
        else:
            raise LocalError(
                f"{name} comes from a Kubernetes reference in the pool; "
                "in local mode set it in the environment"
            )
    if "STORAGE_BUCKET" in env:
        env["STORAGE_BUCKET"] = local_bucket(env["STORAGE_BUCKET"], base)
    return env


def local_tls(env: Mapping[str, str]) -> depth.TLSMaterial | None:
    """The TLS files named in the workers' env (from spec.redis.tlsSecretRef), for our own client."""
    names = ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")
    if not env.get(names[0]) or env.get("REDIS_TLS") != "true":
        return None
    try:
        ca, cert, key = (Path(env[n]).read_bytes() if env.get(n) else b"" for n in names)
    except OSError as err:
        raise LocalError(f"cannot read {err.filename}: {err.strerror}") from None
    return depth.TLSMaterial("local", "", ca, cert, key)


# --- helper services ------------------------------------------------------------------------


def listening(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], what: str, logfile: Path) -> None:
    deadline = time.monotonic() + 15
    while not listening(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-300:] if logfile.exists() else ""
            raise LocalError(f"{what} did not start on {host}:{port}: {' '.join(tail.split())[-200:]}")
        time.sleep(0.05)


def start_redis(port: int, state_dir: Path) -> subprocess.Popen[bytes]:
    """A redis-server with append-only persistence in the state directory."""
    binary = shutil.which("redis-server")
    if not binary:
        raise LocalError(
            "redis-server is not installed: run `sudo apt-get install redis-server` "
            "(or point spec.redis at a running Redis)"
        )
    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    logfile = data / "redis.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
             "--appendonly", "yes", "--protected-mode", "no"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    _wait_listening("127.0.0.1", port, proc, "redis-server", logfile)
    return proc


def start_model_server(port: int, state_dir: Path, latency_ms: float = 0.0) -> subprocess.Popen[bytes]:
    logfile = state_dir / "logs" / "model-server.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiosk_model_server", "--host", "127.0.0.1", "--port", str(port),
             "--latency-ms", str(latency_ms)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    _wait_listening("127.0.0.1", port, proc, "kiosk-model-server", logfile)
    return proc


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the loop -------------------------------------------------------------------------------


@dataclass
class Tick:
    """One loop iteration, for the progress line and for tests."""

    pending: int
    in_flight: int
    workers: int
    desired: int
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    reclaimed: int = 0
    #: One line when Redis could not be measured (the workers were kept).
    redis_error: str | None = None

    def line(self) -> str:
        text = (f"pending={self.pending} in-flight={self.in_flight} "
                f"workers={self.workers} desired={self.desired}")
        if self.started:
            text += f"  +{len(self.started)} started"
        if self.stopped:
            text += f"  -{len(self.stopped)} stopping (idle first)"
        if self.reclaimed:
            text += f"  {self.reclaimed} reclaimed from dead workers"
        return text


class LocalPool:
    """Scale one pool's worker processes with its queue depth: the shared cycle on the local backend."""

    def __init__(self, name: str, spec: PoolSpec, client: redis.Redis, backend: ProcessBackend) -> None:
        self.name, self.spec, self.client, self.backend = name, spec, client, backend
        self.state = PoolState()
        self.worker_backend = LocalBackend(backend)

    def tick(self, now: float | None = None) -> Tick:
        now = time.time() if now is None else now
        pool = cycle.PoolCycle(LOCAL_NAMESPACE, self.name, self.spec, self.state, self.worker_backend,
                               lambda: self.client, now, log)
        result = cycle.run(pool)
        workers = len(self.backend.active())
        obs, scaled = result.observation, result.scaled
        if obs is None or scaled is None:
            return Tick(0, 0, workers, workers, redis_error=result.redis_error)
        m = obs.measurement
        reclaimed = obs.reclaimed.requeued if obs.reclaimed else 0
        return Tick(m.pending, m.in_flight, workers, result.status["desired"], scaled.started, scaled.stopped,
                    reclaimed)


def _printer(plain: bool) -> Any:
    if not plain and sys.stdout.isatty():
        try:
            from rich.console import Console

            console = Console()
            return lambda text: console.log(text, highlight=True)
        except ImportError:
            pass
    return lambda text: print(time.strftime("%H:%M:%S"), text, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiosk-operator --local",
                                description="Run a ConsumerPool on this machine with worker processes.")
    p.add_argument("--local", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-f", "--file", required=True, help="ConsumerPool YAML file")
    p.add_argument("--state-dir", default=None,
                   help="worker pid files, logs, local Redis data (default .kiosk-local/POOL)")
    p.add_argument("--model-server", choices=("auto", "yes", "no"), default="auto",
                   help="start kiosk-model-server when the pool's model server is local and not running")
    p.add_argument("--model-latency-ms", type=float, default=0.0, help="latency of a started model server")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="exit once the queues are empty and every worker has stopped")
    p.add_argument("--plain", action="store_true", help="plain progress lines (no colours)")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point used by ``kiosk-operator --local``; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except LocalError as err:
        print(f"kiosk-operator: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    name, spec, _ = load_pool(args.file)
    state_dir = Path(args.state_dir or Path(".kiosk-local") / name).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    say = _printer(args.plain)
    owned: list[subprocess.Popen[bytes]] = []

    r = spec.redis
    if r.host in LOCAL_HOSTS and r.sentinel is None and not listening(r.host, r.port):
        owned.append(start_redis(r.port, state_dir))
        say(f"started redis-server on 127.0.0.1:{r.port} (data in {state_dir / 'redis'})")
    ms = spec.model_server
    if args.model_server == "yes" or (
        args.model_server == "auto" and ms.host in LOCAL_HOSTS and not listening(ms.host, ms.port)
    ):
        if not listening(ms.host, ms.port):
            owned.append(start_model_server(ms.port, state_dir, args.model_latency_ms))
            say(f"started kiosk-model-server on 127.0.0.1:{ms.port}")

    env = worker_env(spec, Path.cwd())
    env.setdefault("EMPTY_QUEUE_TIMEOUT", "1")
    command = DEFAULT_COMMAND
    if spec.scaling.mode == "Job":
        command = DEFAULT_COMMAND + ("--max-jobs", str(spec.scaling.batch_size))
    backend = ProcessBackend(state_dir, env, prefix=name, command=command,
                             kill_after=spec.worker.termination_grace_period_seconds)
    if backend.workers:
        say(f"adopted {len(backend.workers)} running workers from a previous run")
    client = depth.RedisClients(timeout=2.0).get(r, tls=local_tls(env))
    pool = LocalPool(name, spec, client, backend)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    say(f"pool {name}: queues {','.join(spec.queues)}, mode {spec.scaling.mode}, "
        f"workers {spec.scaling.min_workers}..{spec.scaling.max_workers}; Ctrl-C stops")
    interval = spec.scaling.polling_interval_seconds
    last_line, backoff, seen_work = "", interval, False
    try:
        while not stop.is_set():
            tick = pool.tick()
            if tick.redis_error is not None:
                say(f"Redis unreachable ({tick.redis_error[:80]}); keeping "
                    f"{tick.workers} workers, retrying in {backoff:.1f}s")
                stop.wait(backoff)
                backoff = min(REDIS_BACKOFF_MAX, backoff * 2)
                continue
            backoff = interval
            line = tick.line()
            if line != last_line:
                say(line)
                last_line = line
            seen_work = seen_work or tick.pending + tick.in_flight > 0
            idle = tick.pending + tick.in_flight == 0 and not backend.workers
            if args.exit_when_idle and seen_work and idle:
                say("queues empty and all workers stopped")
                break
            stop.wait(interval)
    finally:
        if backend.workers:
            say(f"stopping {len(backend.workers)} workers (they finish their current item)")
        backend.stop_all(timeout=spec.worker.termination_grace_period_seconds)
        for proc in reversed(owned):
            _stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
