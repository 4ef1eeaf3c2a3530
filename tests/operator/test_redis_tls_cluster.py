"""spec.redis.tlsSecretRef end to end: the real operator (its ServiceAccount, exact RBAC) reads the
pool's Secret through the API and measures a TLS-only Redis that demands a client certificate.

The operator process is started without SSL_CERT_FILE/SSL_CERT_DIR (checked in its /proc environ),
so the test CA can be trusted only through the Secret; a third pool without tlsSecretRef proves
the CA is not trusted otherwise.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

import kiosk_protocol as protocol
from harness.operator_process import OperatorProcess, pool_manifest
from harness.redis_server import RedisServer, TestCA
from harness.wait import wait_for
from kiosk_operator import drift, manifests
from kiosk_operator.spec import parse_spec

pytestmark = pytest.mark.cluster
T = 60
SECRET = "redis-tls"


@pytest.fixture(scope="module")
def mtls_redis() -> Iterator[RedisServer]:
    server = RedisServer(tls=True, tls_auth_clients=True).start()
    yield server
    server.cleanup()


@pytest.fixture
def no_ssl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requested before ``operator``: the operator process inherits this environment."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def _tls_secret(name: str, ca: TestCA) -> dict:
    """The kubernetes.io/tls + ca.crt layout cert-manager writes."""
    files = {"ca.crt": ca.ca_file, "tls.crt": ca.client_cert, "tls.key": ca.client_key}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "data": {key: base64.b64encode(Path(path).read_bytes()).decode() for key, path in files.items()},
    }


def _process_env(op: OperatorProcess) -> dict[str, str]:
    assert op.proc is not None
    raw = Path(f"/proc/{op.proc.pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _reachable(api, pool: str, status: str) -> dict | None:
    cond = api.condition(pool, "RedisReachable")
    return cond if cond and cond["status"] == status else None


def test_operator_measures_tls_redis_with_the_pool_secret(
    no_ssl_env, operator, api, k8s_cluster, k8s_namespace, mtls_redis
):
    assert not {"SSL_CERT_FILE", "SSL_CERT_DIR"} & _process_env(operator).keys(), "the test would prove nothing"
    client = mtls_redis.client()
    client.flushall()
    for i in range(3):
        protocol.submit_job(client, "segmentation", f"uploads/img{i}.tif", "segmentation", "1")
    k8s_cluster.request("POST", f"/api/v1/namespaces/{k8s_namespace}/secrets", _tls_secret(SECRET, mtls_redis.ca))

    tls = {"tls": True, "tlsSecretRef": {"name": SECRET, "clientCertificate": True}}
    api.create_pool(pool_manifest("tls", mtls_redis.port, redis=tls))
    api.create_pool(pool_manifest("nosecret", mtls_redis.port, redis={"tls": True, "tlsSecretRef": {"name": "absent"}}))
    api.create_pool(pool_manifest("noref", mtls_redis.port, redis={"tls": True}))

    status = wait_for(
        lambda: (s := api.pool("tls").get("status", {})).get("pending") == 3 and s, T, "status pending=3 over TLS"
    )
    cond = next(c for c in status["conditions"] if c["type"] == "RedisReachable")
    assert (cond["status"], cond["reason"]) == ("True", "Measured")
    wait_for(lambda: api.replicas(manifests.deployment_name("tls")) == 1, T, "1 worker for 3 items")

    # The workers get the same Secret, mounted read-only, and the env pointing into it; the API
    # server's defaults are no drift (the operator would rewrite the Deployment every cycle).
    dep = api.deployment(manifests.deployment_name("tls"))
    pod = dep["spec"]["template"]["spec"]
    assert pod["volumes"][0]["secret"]["secretName"] == SECRET
    container = pod["containers"][0]
    assert container["volumeMounts"][0]["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REDIS_TLS_CERT_FILE"] == f"{manifests.REDIS_TLS_DIR}/tls.crt"
    want = manifests.build_deployment("tls", k8s_namespace, parse_spec(api.pool("tls")["spec"]), 1)
    assert drift.differences(want["spec"]["template"], dep["spec"]["template"]) == []

    missing = wait_for(lambda: _reachable(api, "nosecret", "False"), T, "nosecret: RedisReachable False")
    assert missing["reason"] == "SecretMissing" and "absent" in missing["message"], missing
    # Without the Secret's CA the operator refuses the server's certificate.
    untrusted = wait_for(lambda: _reachable(api, "noref", "False"), T, "noref: RedisReachable False")
    assert untrusted["reason"] == "RedisUnreachable", untrusted
    assert operator.alive()
