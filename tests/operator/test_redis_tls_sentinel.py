"""The operator measures queue depth over TLS and through Sentinel (real servers), and the
worker environment it builds (manifests.build_worker_env) reaches the same Redis.

A private CA (and a client certificate) reaches both sides through spec.redis.tlsSecretRef:
the operator gets the Secret's contents (depth.tls_material), workers the mounted files.
Without it the operator trusts SSL_CERT_FILE / the system CAs, workers REDIS_TLS_CA_FILE.
"""

from __future__ import annotations

import base64
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import kiosk_protocol as protocol
from harness.ports import free_port
from harness.redis_server import RedisServer, SentinelGroup, TestCA
from kiosk_operator import depth, manifests
from kiosk_operator.spec import PoolSpec, TLSSecretRef, parse_spec
from kiosk_protocol import JobStore
from kiosk_protocol.redis_config import connect
from kiosk_protocol.settings import load_settings

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
    worker = JobStore(connect(load_settings(env).redis_config()), env["WORKER_NAME"])
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
        worker = JobStore(connect(load_settings(env).redis_config()), "pool-s1")
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


# --- spec.redis.tlsSecretRef: the operator's side ---------------------------------------------


def _secret(ca: Path | bytes | None, cert: Path | None = None, key: Path | None = None, version: str = "1") -> dict:
    """A Secret as the API returns it (data base64)."""
    data = {}
    for name, value in (("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)):
        if value is not None:
            raw = value if isinstance(value, bytes) else value.read_bytes()
            data[name] = base64.b64encode(raw).decode()
    meta = {"name": "redis-tls", "namespace": "ns1", "resourceVersion": version}
    return {"metadata": meta, "data": data, "type": "kubernetes.io/tls"}


@pytest.mark.parametrize(
    "secret,mutual,message",
    [
        ({"metadata": {"name": "redis-tls", "namespace": "ns1"}, "data": {}}, False, "no key 'ca.crt'"),
        ("ca-only", True, "no key 'tls.crt' (clientCertificate is true)"),
        ({"metadata": {"name": "redis-tls", "namespace": "ns1"}, "data": {"ca.crt": "@@"}}, False, "not base64"),
        ("garbage", False, "'ca.crt' holds no PEM certificate"),
    ],
    ids=["no-ca", "no-client-cert", "not-base64", "not-pem"],
)
def test_tls_material_names_what_is_missing(tls_server, secret, mutual, message):
    if secret == "ca-only":
        secret = _secret(tls_server.ca.ca_file)
    elif secret == "garbage":
        secret = _secret(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(LookupError) as err:
        depth.tls_material(secret, TLSSecretRef("redis-tls", mutual))
    assert message in str(err.value) and "Secret ns1/redis-tls" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def mtls_server() -> Iterator[RedisServer]:
    """TLS only, and a client certificate signed by the CA is required (tls-auth-clients yes)."""
    server = RedisServer(tls=True, tls_auth_clients=True).start()
    yield server
    server.cleanup()


def test_operator_mutual_tls_from_the_secret(mtls_server, clients, monkeypatch):
    """No SSL_CERT_FILE: the CA and client certificate come only from the Secret's contents."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ca = mtls_server.ca
    direct = mtls_server.client()
    direct.flushall()
    for i in range(4):
        protocol.submit_job(direct, QUEUE, f"img{i}.tif", "segmentation", "1")
    spec = _spec({"host": "127.0.0.1", "port": mtls_server.port, "tls": True,
                  "tlsSecretRef": {"name": "redis-tls", "clientCertificate": True}})
    ref = spec.redis.tls_secret_ref
    material = depth.tls_material(_secret(ca.ca_file, ca.client_cert, ca.client_key), ref)
    client = clients.get(spec.redis, "", material)
    m = depth.measure(client, list(spec.queues), time.time())
    assert (m.pending, m.in_flight) == (4, 0)
    assert clients.get(spec.redis, "", material) is client  # reused per tick

    # The files live in a private directory: only the operator's user can read them.
    assert stat.S_IMODE(clients.tls_dir.stat().st_mode) == 0o700
    files = sorted(f for f in clients.tls_dir.rglob("*") if f.is_file())
    assert [f.name for f in files] == ["ca.crt", "tls.crt", "tls.key"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert files[2].read_bytes() == ca.client_key.read_bytes()

    # Only the CA: the server demands a certificate and hangs up (RedisUnreachable, one line).
    ca_only = _spec({"host": "127.0.0.1", "port": mtls_server.port, "tls": True,
                     "tlsSecretRef": {"name": "redis-ca"}})
    other = depth.tls_material(_secret(ca.ca_file) | {"metadata": {"name": "redis-ca", "namespace": "ns1"}},
                               ca_only.redis.tls_secret_ref)
    with pytest.raises(redis.ConnectionError) as err:
        depth.measure(clients.get(ca_only.redis, "", other), [QUEUE], time.time())
    assert "\n" not in str(err.value)
    tls_dir = clients.tls_dir
    clients.close()
    assert not tls_dir.exists(), "close() removes the key material"


def test_operator_follows_a_rotated_secret(tls_server, clients, tmp_path, monkeypatch):
    """A new resourceVersion with new content: new client and files, the old ones are dropped."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    spec = _spec({"host": "127.0.0.1", "port": tls_server.port, "tls": True,
                  "passwordSecretRef": {"name": "redis", "key": "password"},
                  "tlsSecretRef": {"name": "redis-tls"}})
    ref = spec.redis.tls_secret_ref
    wrong = depth.tls_material(_secret(TestCA(tmp_path / "other").ca_file, version="7"), ref)
    with pytest.raises(redis.ConnectionError, match="(?i)certificate verify failed"):
        _measure_with(clients, spec, wrong)
    old_dirs = {d.name for d in clients.tls_dir.iterdir()}
    assert old_dirs == {wrong.digest}

    right = depth.tls_material(_secret(tls_server.ca.ca_file, version="8"), ref)
    tls_server.client().flushall()
    protocol.submit_job(tls_server.client(), QUEUE, "a.tif", "segmentation", "1")
    assert _measure_with(clients, spec, right).pending == 1
    assert {d.name for d in clients.tls_dir.iterdir()} == {right.digest}, "old material removed"
    # Same resourceVersion again: the same client, nothing rewritten.
    assert clients.get(spec.redis, PASSWORD, right) is clients.get(spec.redis, PASSWORD, right)


def _measure_with(clients: depth.RedisClients, spec: PoolSpec, tls: depth.TLSMaterial) -> depth.Measurement:
    return depth.measure(clients.get(spec.redis, PASSWORD, tls), list(spec.queues), time.time())


def _kubelet_mount(pod: dict, secret: dict, root: Path) -> dict[str, str]:
    """What the kubelet does with the pod's secret volume: each listed key as a file, under ``root``.

    Returns mountPath -> local directory, to translate the env's paths.
    """
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}  # not the /tmp emptyDir
    mounts = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        if mount["name"] not in volumes:
            continue
        source = volumes[mount["name"]]
        assert source["secretName"] == secret["metadata"]["name"] and mount["readOnly"] is True
        where = root / mount["name"]
        where.mkdir()
        for item in source["items"]:
            (where / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
        mounts[mount["mountPath"]] = str(where)
    return mounts


def test_worker_pod_reaches_mutual_tls_redis_through_the_mounted_secret(mtls_server, clients, tmp_path, monkeypatch):
    """The pod the operator builds (volume items, mount, env paths) gives the worker a working mTLS client."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ca = mtls_server.ca
    secret = _secret(ca.ca_file, ca.client_cert, ca.client_key) | {
        "metadata": {"name": "redis-tls", "namespace": "ns1", "resourceVersion": "3"}
    }
    # A CA's own key under an unused name must not reach the pod.
    secret["data"]["ca.key"] = base64.b64encode(ca.ca_key.read_bytes()).decode()
    spec = _spec({"host": "127.0.0.1", "port": mtls_server.port, "tls": True,
                  "tlsSecretRef": {"name": "redis-tls", "clientCertificate": True}})
    pod = manifests.build_deployment("pool", "ns1", spec, 1)["spec"]["template"]["spec"]
    mounts = _kubelet_mount(pod, secret, tmp_path)
    assert not list(tmp_path.rglob("ca.key"))
    env = _worker_environ(spec, "pool-tls1", "")
    for name, value in env.items():
        for mount_path, local in mounts.items():
            if value.startswith(mount_path + "/"):
                env[name] = local + value[len(mount_path):]
    assert {"REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"} <= env.keys()

    direct = mtls_server.client()
    direct.flushall()
    protocol.submit_job(direct, QUEUE, "a.tif", "segmentation", "1")
    protocol.submit_job(direct, QUEUE, "b.tif", "segmentation", "1")
    worker = JobStore(connect(load_settings(env).redis_config()), env["WORKER_NAME"])
    assert worker.pop(QUEUE, timeout=1)
    worker.heartbeat([QUEUE], ttl=10)
    m = depth.measure(clients.get(spec.redis, "", depth.tls_material(secret, spec.redis.tls_secret_ref)),
                      [QUEUE], time.time())
    assert (m.pending, m.in_flight, m.busy_workers) == (1, 1, {"pool-tls1"})
