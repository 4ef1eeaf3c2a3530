"""The operator measures queue depth over TLS and through Sentinel (real servers), and the
worker environment it builds (manifests.build_worker_env) reaches the same Redis.

The operator trusts a private CA through the standard SSL_CERT_FILE variable; workers
through REDIS_TLS_CA_FILE (set in the pool's worker.env).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from harness.ports import free_port
from harness.redis_server import RedisServer, SentinelGroup
from kiosk_operator import depth, manifests
from kiosk_operator.spec import PoolSpec, parse_spec
from kiosk_worker import protocol
from kiosk_worker.protocol import JobStore
from kiosk_worker.redis_conn import connect
from kiosk_worker.settings import load_settings

QUEUE = "segmentation"
PASSWORD = "op-s3cret"


def _spec(redis_spec: dict[str, Any], worker_env: dict[str, str] | None = None) -> PoolSpec:
    worker: dict[str, Any] = {"image": "kiosk-worker:test"}
    if worker_env:
        worker["env"] = [{"name": k, "value": v} for k, v in worker_env.items()]
    return parse_spec({"queues": [QUEUE], "worker": worker, "redis": redis_spec})


def _worker_environ(spec: PoolSpec, pod: str, password: str) -> dict[str, str]:
    """What the kubelet would give the worker container: values, the Secret, the pod name."""
    env = {}
    for item in manifests.build_worker_env(spec):
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[item["name"]] = password
        elif "fieldRef" in source:
            env[item["name"]] = pod
        else:
            env[item["name"]] = item["value"]
    return env


def _measure(clients: depth.RedisClients, spec: PoolSpec, password: str = PASSWORD) -> depth.Measurement:
    return depth.measure(clients.get(spec.redis, password), list(spec.queues), time.time())


@pytest.fixture()
def clients() -> Iterator[depth.RedisClients]:
    c = depth.RedisClients(timeout=2.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    server = RedisServer(tls=True, password=PASSWORD).start()
    yield server
    server.cleanup()


def test_operator_and_worker_agree_over_tls(tls_server, clients, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.ca.ca_file))
    direct = tls_server.client()
    direct.flushall()
    spec = _spec(
        {"host": "127.0.0.1", "port": tls_server.port, "tls": True,
         "passwordSecretRef": {"name": "redis", "key": "password"}},
        {"REDIS_TLS_CA_FILE": str(tls_server.ca.ca_file)},
    )
    for i in range(3):
        protocol.submit_job(direct, QUEUE, f"img{i}.tif", "segmentation", "1")

    # The worker, configured only by the env the operator builds for its pod, takes one item.
    env = _worker_environ(spec, "pool-abc12", PASSWORD)
    assert env["REDIS_TLS"] == "true" and env["REDIS_PASSWORD"] == PASSWORD
    worker = JobStore(connect(load_settings(env)), env["WORKER_NAME"])
    assert worker.pop(QUEUE, timeout=1)
    worker.heartbeat([QUEUE], ttl=10)

    m = _measure(clients, spec)
    assert (m.pending, m.in_flight) == (2, 1)
    assert m.busy_workers == {"pool-abc12"}
    assert clients.get(spec.redis, PASSWORD) is clients.get(spec.redis, PASSWORD)  # reused per tick


def test_operator_tls_verifies_the_server(tls_server, clients, monkeypatch):
    """Without the CA, the operator refuses the certificate: a one-line RedisError (RedisUnreachable)."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    spec = _spec({"host": "127.0.0.1", "port": tls_server.port, "tls": True})
    with pytest.raises(redis.ConnectionError, match="(?i)certificate verify failed") as err:
        _measure(clients, spec)
    assert "\n" not in str(err.value)


def test_operator_wrong_password_over_tls(tls_server, clients, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.ca.ca_file))
    spec = _spec({"host": "127.0.0.1", "port": tls_server.port, "tls": True})
    with pytest.raises(redis.AuthenticationError):
        _measure(clients, spec, password="wrong")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_operator_measures_through_sentinel_across_a_failover(tls, clients, monkeypatch):
    group = SentinelGroup(tls=tls, password=PASSWORD)
    try:
        if tls:
            monkeypatch.setenv("SSL_CERT_FILE", str(group.master.ca.ca_file))
        worker_env = {"REDIS_TLS_CA_FILE": str(group.master.ca.ca_file)} if tls else None
        spec = _spec(
            {"host": "never-used", "tls": tls, "passwordSecretRef": {"name": "redis", "key": "password"},
             "sentinel": {"hosts": [group.sentinel.address], "master": "mymaster"}},
            worker_env,
        )
        env = _worker_environ(spec, "pool-s1", PASSWORD)
        assert env["REDIS_SENTINEL_HOSTS"] == group.sentinel.address
        worker = JobStore(connect(load_settings(env)), "pool-s1")
        protocol.submit_job(worker.client, QUEUE, "a.tif", "segmentation", "1")
        protocol.submit_job(worker.client, QUEUE, "b.tif", "segmentation", "1")
        assert worker.pop(QUEUE, timeout=1)
        worker.heartbeat([QUEUE], ttl=10)
        m = _measure(clients, spec)
        assert (m.pending, m.in_flight, m.busy_workers) == (1, 1, {"pool-s1"})

        new = group.failover()
        assert new is not group.master
        protocol.submit_job(new.client(), QUEUE, "c.tif", "segmentation", "1")
        # The operator's cached client follows Sentinel to the new master (replicated data + c.tif).
        m = _measure(clients, spec)
        assert (m.pending, m.in_flight) == (2, 1)
    finally:
        group.cleanup()


def test_operator_unreachable_sentinel_is_one_line(clients):
    port = free_port()
    spec = _spec({"sentinel": {"hosts": [f"127.0.0.1:{port}"], "master": "mymaster"}})
    with pytest.raises(redis.ConnectionError) as err:
        _measure(clients, spec, password="")
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert "no Redis master 'mymaster'" in message
