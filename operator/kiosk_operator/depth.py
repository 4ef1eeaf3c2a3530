"""Queue depth of a pool from Redis: pending + in-flight via the worker registry, never SCAN.

Thin on purpose: the key layout and the measurement live in kiosk_protocol.
RedisClients also holds the pools' TLS material (spec.redis.tlsSecretRef) as files in a
private directory, because Python's ssl loads client certificates from files only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

import kiosk_protocol as protocol
from kiosk_operator.manifests import TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY, tls_secret_keys
from kiosk_operator.spec import RedisSpec, TLSSecretRef
from kiosk_protocol import WorkerState, fields
from kiosk_protocol.redis_config import RedisConfig, connect
from kiosk_protocol.registry import QueueDepth, combine_depths, measure_depths
from kiosk_protocol.settings import Settings


@dataclass(frozen=True)
class Measurement:
    """One depth measurement, reduced to what the scaling decision needs."""

    pending: int
    in_flight: int
    busy_workers: frozenset[str]
    mean_service_seconds: float | None
    service_samples: int
    #: Every registered worker as read (reclaim reuses them instead of reading again).
    workers: tuple[WorkerState, ...] = ()

    @property
    def depth(self) -> int:
        return self.pending + self.in_flight


def measure(
    client: redis.Redis, queues: tuple[str, ...] | list[str], now: float, heartbeat_ttl: float | None = None
) -> Measurement:
    """O(queues + workers) Redis commands; busy = live workers holding at least one item.

    ``heartbeat_ttl``: the liveness rule (``protocol.heartbeat_ttl``) of the pool's heartbeat
    interval; by default that of a worker's default interval.
    """
    return from_depth(protocol.measure_depth(client, queues, with_info=True), now, heartbeat_ttl)


def from_depth(depth: QueueDepth, now: float, heartbeat_ttl: float | None = None) -> Measurement:
    """What the scaling decision needs from a depth read (own or shared): busy workers, service time."""
    if heartbeat_ttl is None:
        heartbeat_ttl = protocol.heartbeat_ttl(Settings.heartbeat_interval)
    busy = set()
    total_time, samples = 0.0, 0
    for w in depth.workers:
        if w.in_flight > 0 and w.alive(now, heartbeat_ttl):
            busy.add(w.name)
        # Workers report a smoothed per-item service time (drain-time scaling).
        try:
            n = int(w.info.get(fields.HB_SERVICE_SAMPLES, "0") or 0)
            mean = float(w.info.get(fields.HB_SERVICE_EWMA, "0") or 0)
        except ValueError:
            continue
        if n > 0 and mean > 0:
            total_time += mean * n
            samples += n
    mean_service = total_time / samples if samples else None
    return Measurement(depth.pending, depth.in_flight, frozenset(busy), mean_service, samples, depth.workers)


#: Seconds a queue nobody asked about stays in its server's shared measurement (a deleted pool).
FORGET_QUEUE_SECONDS = 60.0


class _Round:
    """One shared measurement of a server: when it started, and its per-queue result or error."""

    def __init__(self, started: float, queues: frozenset[str]) -> None:
        self.started, self.queues = started, queues
        self.done = threading.Event()
        self.depths: dict[str, QueueDepth | redis.ResponseError] = {}
        self.error: BaseException | None = None


class DepthBatch:
    """Pools on one Redis share one measurement pipeline per polling tick instead of one each.

    The group is the client object (RedisClients hands out one per connection key). A cycle
    asking within ``max_age`` seconds of the start of the server's last round reads its queues
    from that round (waiting for it if it is still running); otherwise it starts a new round
    over every queue asked about recently. A round that fails raises in every cycle that reads
    it (they share the server); a broken queue fails only the pools that measure it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        #: id(client) -> (client, queue -> last asked, last round)
        self._groups: dict[int, tuple[redis.Redis, dict[str, float], _Round | None]] = {}
        #: Rounds run (pipelines sent), for tests and metrics.
        self.rounds = 0

    def depth(self, client: redis.Redis, queues: tuple[str, ...] | list[str], max_age: float) -> QueueDepth:
        """The pool's depth from a round of its server at most ``max_age`` s old (not yet started: now)."""
        t = self.clock()
        with self._lock:
            _, asked, last = self._groups.get(id(client), (client, {}, None))
            for q in queues:
                asked[q] = t
            own = lead = False
            if last is not None and t - last.started <= max_age:
                # New to this server: measured alone now, in the shared round from the next tick.
                own = not last.queues.issuperset(queues)
                round_ = last
            else:
                for q in [q for q, seen in asked.items() if t - seen > FORGET_QUEUE_SECONDS]:
                    del asked[q]
                round_, lead = _Round(t, frozenset(asked)), True
                last = round_
            self.rounds += 1 if own or lead else 0
            self._groups[id(client)] = (client, asked, last)
        if own:
            return combine_depths(queues, measure_depths(client, queues, with_info=True))
        if lead:
            try:
                round_.depths = measure_depths(client, round_.queues, with_info=True)
            except BaseException as exc:
                round_.error = exc
            finally:
                round_.done.set()
        else:
            round_.done.wait()
        if round_.error is not None:
            raise round_.error
        return combine_depths(queues, round_.depths)

    def measure(
        self,
        client: redis.Redis,
        queues: tuple[str, ...] | list[str],
        now: float,
        heartbeat_ttl: float | None = None,
        max_age: float = 0.25,
    ) -> Measurement:
        """``measure``, from the shared round of the client's server."""
        return from_depth(self.depth(client, queues, max_age), now, heartbeat_ttl)


@dataclass(frozen=True)
class TLSMaterial:
    """A pool's TLS Secret as PEM bytes; ``source`` is namespace/name, ``version`` its resourceVersion."""

    source: str
    version: str
    ca: bytes
    cert: bytes = b""
    key: bytes = b""

    @property
    def digest(self) -> str:
        return hashlib.sha256(b"\0".join((self.ca, self.cert, self.key))).hexdigest()[:32]


def tls_material(secret: Mapping[str, Any], ref: TLSSecretRef) -> TLSMaterial:
    """The keys a pool needs from its TLS Secret (as read from the API, data base64).

    Pure. A missing or unusable key raises LookupError with one line naming it (SecretMissing).
    """
    meta = secret.get("metadata") or {}
    source = f"{meta.get('namespace', '')}/{meta.get('name', ref.name)}"
    data = secret.get("data") or {}
    values: dict[str, bytes] = {}
    for key in tls_secret_keys(ref):
        raw = data.get(key)
        if not raw:
            why = " (clientCertificate is true)" if key != TLS_CA_KEY else ""
            raise LookupError(f"Secret {source} has no key {key!r}{why}")
        try:
            values[key] = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise LookupError(f"Secret {source} key {key!r} is not base64") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=values[TLS_CA_KEY].decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise LookupError(f"Secret {source} key {TLS_CA_KEY!r} holds no PEM certificate") from None
    return TLSMaterial(
        source,
        str(meta.get("resourceVersion", "")),
        values[TLS_CA_KEY],
        values.get(TLS_CERT_KEY, b""),
        values.get(TLS_KEY_KEY, b""),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class RedisClients:
    """One client per distinct Redis (and TLS material) of the pools, reused across ticks.

    TLS material is written once per content to ``<private dir>/<digest>/`` (dir 0700, files
    0600). When a Secret's resourceVersion changes and its content with it, the clients and
    files of the old content are dropped (unless another Secret still has that content).
    """

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._clients: dict[tuple, redis.Redis] = {}
        self._lock = threading.Lock()
        self._tls_dir: Path | None = None
        #: Secret (namespace/name) -> (resourceVersion, content digest) last used.
        self._tls_seen: dict[str, tuple[str, str]] = {}

    @property
    def tls_dir(self) -> Path | None:
        """The private directory of the TLS files (None until a pool uses tlsSecretRef)."""
        return self._tls_dir

    def get(self, spec: RedisSpec, password: str = "", tls: TLSMaterial | None = None) -> redis.Redis:
        """The client for ``spec`` (created on first use; nothing is contacted yet)."""
        sentinel = spec.sentinel
        with self._lock:
            files = self._tls_files(tls) if tls is not None and spec.tls else {}
            key = (
                spec.host,
                spec.port,
                spec.tls,
                password,
                sentinel.hosts if sentinel else (),
                sentinel.master if sentinel else "",
                files.get("digest", ""),
            )
            client = self._clients.get(key)
            if client is None:
                config = RedisConfig(
                    host=spec.host,
                    port=spec.port,
                    password=password,
                    tls=spec.tls,
                    tls_ca_file=files.get("ca", ""),
                    tls_cert_file=files.get("cert", ""),
                    tls_key_file=files.get("key", ""),
                    sentinel_hosts=",".join(sentinel.hosts) if sentinel else "",
                    sentinel_master=sentinel.master if sentinel else "",
                    timeout=self.timeout,
                )
                client = self._clients[key] = connect(config)
            return client

    def _tls_files(self, tls: TLSMaterial) -> dict[str, str]:
        """Paths of the material's files (written when new); retires the Secret's previous content."""
        seen = self._tls_seen.get(tls.source)
        digest = seen[1] if seen and seen[0] == tls.version and tls.version else tls.digest
        if self._tls_dir is None:
            self._tls_dir = Path(tempfile.mkdtemp(prefix="kiosk-operator-tls-"))  # 0700
        where = self._tls_dir / digest
        files = {"digest": digest, "ca": str(where / TLS_CA_KEY)}
        if tls.cert:
            files.update(cert=str(where / TLS_CERT_KEY), key=str(where / TLS_KEY_KEY))
        if not where.is_dir():
            where.mkdir(mode=0o700)
            _write_private(where / TLS_CA_KEY, tls.ca)
            if tls.cert:
                _write_private(where / TLS_CERT_KEY, tls.cert)
                _write_private(where / TLS_KEY_KEY, tls.key)
        self._tls_seen[tls.source] = (tls.version, digest)
        if seen and seen[1] != digest and all(d != seen[1] for _, d in self._tls_seen.values()):
            self._retire(seen[1])
        return files

    def _retire(self, digest: str) -> None:
        for key in [k for k in self._clients if k[-1] == digest]:
            self._clients.pop(key).close()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir / digest, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            self._tls_seen.clear()
            if self._tls_dir is not None:
                shutil.rmtree(self._tls_dir, ignore_errors=True)
                self._tls_dir = None
