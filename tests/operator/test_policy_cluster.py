"""The admin policy against the real API server: the chart's ValidatingAdmissionPolicy refuses a
pool, the operator (KIOSK_POLICY as the chart renders it) refuses what CEL cannot see, and worker
pods are admitted in a namespace enforcing the ``restricted`` Pod Security Standard.

Pools are created by a namespace user, impersonated with ``kubectl --as``: it may create
ConsumerPools but not Deployments or Secrets.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import kiosk_protocol as protocol
from harness.cluster import ApiError, LocalCluster, binary_path, binary_versions
from harness.operator_process import pool_manifest
from harness.redis_server import RedisServer
from harness.wait import wait_for
from kiosk_operator import manifests, policy

pytestmark = pytest.mark.cluster
T = 60
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kiosk-operator"
USER = "pool-author@example.com"
PREFIX = "registry.example.com/kiosk/"
IMAGE = PREFIX + "worker:1"
#: The chart's default policy plus an image prefix, a PriorityClass and a pull Secret, as values and as
#: the operator's KIOSK_POLICY.
POLICY = {
    **yaml.safe_load((CHART / "values.yaml").read_text())["policy"],
    "allowedImagePrefixes": [PREFIX],
    "allowedPriorityClasses": ["batch-low"],
    "allowedImagePullSecrets": ["kiosk-pull"],
}


def _pool(name: str, redis_port: int = 6379, **spec: Any) -> dict[str, Any]:
    spec.setdefault("worker", {})
    spec["worker"].setdefault("image", IMAGE)
    spec.setdefault("redis", {"host": "redis", "port": redis_port})
    return pool_manifest(name, redis_port, **spec)


@pytest.fixture
def author(k8s_cluster: LocalCluster, k8s_namespace: str) -> str:
    """A namespace user who may write ConsumerPools and read pods/events, nothing else."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pool-author"},
        "rules": [
            {"apiGroups": ["kiosk.deepcell.org"], "resources": ["consumerpools"],
             "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list", "watch"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "pool-author"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pool-author"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
    }
    k8s_cluster.apply([role, binding], namespace=k8s_namespace)
    for verb, resource, allowed in [("create", "consumerpools.kiosk.deepcell.org", "yes"),
                                    ("get", "secrets", "no"), ("create", "deployments.apps", "no")]:
        def answer(v: str = verb, r: str = resource) -> str:
            out = k8s_cluster.kubectl("auth", "can-i", v, r, "-n", k8s_namespace, "--as", USER, check=False)
            return out.stdout.strip()
        wait_for(lambda a=allowed, f=answer: f() == a, 30, f"{USER} can-i {verb} {resource} == {allowed}")
    return USER


def create_as(cluster: LocalCluster, ns: str, manifest: dict[str, Any]) -> subprocess.CompletedProcess:
    return cluster.kubectl("create", "-n", ns, "--as", USER, "-f", "-", input=json.dumps(manifest), check=False)


@pytest.fixture
def admission(k8s_cluster: LocalCluster, k8s_namespace: str, crd: Any, tmp_path: Path) -> Iterator[None]:
    """The chart's ValidatingAdmissionPolicy and binding for the test namespace (helm template)."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"policy": POLICY}))
    release = f"p{uuid.uuid4().hex[:6]}"
    out = subprocess.run(
        [str(binary_path("helm")), "template", release, str(CHART), "--namespace", k8s_namespace,
         "--kube-version", binary_versions()["kube-apiserver"], "-f", str(values),
         "--show-only", "templates/admission-policy.yaml"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    k8s_cluster.apply(docs)
    vap_path = f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{docs[0]['metadata']['name']}"

    def type_checked() -> Any:
        status = k8s_cluster.get(vap_path).get("status") or {}
        return status.get("observedGeneration") == 1 and status

    status = wait_for(type_checked, 30, "the admission policy type-checked")
    assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status["typeChecking"]
    # Enforced once a server-side dry run of an unlisted image is refused.
    probe = _pool("probe", worker={"image": "docker.io/other/worker:1"})
    wait_for(lambda: k8s_cluster.kubectl("create", "-n", k8s_namespace, "--dry-run=server", "-f", "-",
                                         input=json.dumps(probe), check=False).returncode != 0,
             30, "the admission policy enforced")
    try:
        yield
    finally:
        for doc in reversed(docs):
            try:
                k8s_cluster.request("DELETE", k8s_cluster.api.object_path(doc))
            except ApiError:
                pass


SECRET_REF = {"passwordSecretRef": {"name": "redis", "key": "password"}}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"worker": {"image": "docker.io/someone/miner:latest"}}, "spec.worker.image"),
        ({"worker": {"serviceAccountName": "kiosk-operator"}}, "spec.worker.serviceAccountName"),
        ({"worker": {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]}},
         "spec.worker.env[].valueFrom"),
        ({"worker": {"envFrom": [{"secretRef": {"name": "db"}}]}}, "spec.worker.envFrom"),
        ({"worker": {"tolerations": [{"operator": "Exists"}]}}, "spec.worker.tolerations"),
        ({"worker": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}, "spec.worker.volumes"),
        ({"worker": {"securityContext": {"privileged": True}}}, "spec.worker.securityContext"),
        ({"worker": {"podSecurityContext": {"runAsUser": 0}}}, "spec.worker.podSecurityContext"),
        ({"redis": {"host": "evil.example.com", **SECRET_REF}}, "spec.redis.host"),
        ({"redis": {"host": "redis.kube-system.svc", **SECRET_REF}}, "spec.redis.host"),
        ({"redis": {"sentinel": {"hosts": ["evil.example.com:26379"]}, **SECRET_REF}}, "spec.redis.sentinel.hosts"),
        ({"worker": {"priorityClassName": "system-cluster-critical"}}, "spec.worker.priorityClassName"),
        ({"worker": {"imagePullSecrets": [{"name": "kiosk-pull"}, {"name": "team-b-registry"}]}},
         "spec.worker.imagePullSecrets[].name: team-b-registry not"),
    ],
    ids=["image", "service-account", "value-from", "env-from", "toleration", "host-path", "privileged",
         "root", "redis-host", "redis-other-namespace", "sentinel-host", "priority-class", "pull-secret"],
)
def test_admission_refuses_a_violating_pool_naming_the_field(
    spec, field, admission, author, k8s_cluster, k8s_namespace
):
    result = create_as(k8s_cluster, k8s_namespace, _pool("bad", **spec))
    assert result.returncode != 0, result.stdout
    assert "denied request" in result.stderr and field in result.stderr, result.stderr
    assert not k8s_cluster.kubectl_json("get", "consumerpools", "-n", k8s_namespace)["items"]


def test_admission_accepts_a_compliant_pool(admission, author, k8s_cluster, k8s_namespace):
    """Not vacuous: what the policy allows (GPU toleration, same-namespace Redis with a password) is created."""
    spec = {
        "worker": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            "securityContext": {"runAsUser": 20000},
            "volumes": [{"name": "cache", "emptyDir": {}}],
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            "priorityClassName": "batch-low",
            "imagePullSecrets": [{"name": "kiosk-pull"}],
        },
        "redis": {"host": f"redis-master.{k8s_namespace}.svc", **SECRET_REF},
    }
    result = create_as(k8s_cluster, k8s_namespace, _pool("good", **spec))
    assert result.returncode == 0, result.stderr


# --- the operator's own checks (no admission policy: a pool created before it, or with it off) ---


@pytest.fixture
def policed_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requested before ``operator``: it inherits KIOSK_POLICY as the chart renders it."""
    monkeypatch.setenv(policy.POLICY_ENV, json.dumps(POLICY))


def _secret(name: str, labelled: bool, password: str = "s3cret") -> dict[str, Any]:
    labels = {policy.SECRET_LABEL: "true"} if labelled else {}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels},
            "stringData": {"password": password}}


def _refused(api, name: str, field: str) -> dict[str, Any]:
    def cond() -> Any:
        c = api.condition(name, "Ready")
        return c if c and c["reason"] == "PolicyViolation" else None

    found = wait_for(cond, T, f"PolicyViolation on {name}")
    assert found["status"] == "False" and field in found["message"], found
    events = api.wait_events(name, "PolicyViolation")
    assert any(field in e["message"] and e["type"] == "Warning" for e in events), events
    return found


def test_operator_reads_no_unlabelled_secret_and_sends_none_to_a_disallowed_host(
    policed_operator, operator, api, author, k8s_cluster, k8s_namespace, redis_server, redis_client
):
    k8s_cluster.apply([_secret("unlabelled", False), _secret("labelled", True)], namespace=k8s_namespace)
    redis_client.config_resetstat()
    # 1. An unlabelled Secret (the author cannot read it) is not read for a pool of the author.
    unlabelled = _pool("steal", redis={"host": "redis", "passwordSecretRef": {"name": "unlabelled", "key": "password"}})
    assert create_as(k8s_cluster, k8s_namespace, unlabelled).returncode == 0
    _refused(api, "steal", "spec.redis.passwordSecretRef")
    # 2. A labelled Secret is not sent to a host outside the policy (here a real Redis on 127.0.0.1).
    leak = _pool("leak", redis_server.port,
                 redis={"host": "127.0.0.1", "passwordSecretRef": {"name": "labelled", "key": "password"}})
    api.create_pool(leak)  # as admin: no admission policy in this test, the operator alone decides
    _refused(api, "leak", "spec.redis.host")
    assert "cmdstat_auth" not in redis_client.info("commandstats"), "the password reached the disallowed host"
    for pool in ("steal", "leak"):
        assert api.deployment(manifests.deployment_name(pool)) is None, f"{pool}: nothing is created"
    # Not vacuous: a plain pool of the same operator gets its Deployment.
    api.create_pool(_pool("plain", redis_server.port, redis={"host": "127.0.0.1", "port": redis_server.port}))
    wait_for(lambda: api.deployment(manifests.deployment_name("plain")), T, "the plain pool's Deployment")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"worker": {"image": "docker.io/someone/miner:latest"}}, "spec.worker.image"),
        ({"worker": {"serviceAccountName": "kiosk-operator"}}, "spec.worker.serviceAccountName"),
        ({"worker": {"priorityClassName": "system-cluster-critical"}}, "spec.worker.priorityClassName"),
        ({"worker": {"imagePullSecrets": [{"name": "team-b-registry"}]}}, "spec.worker.imagePullSecrets[0].name"),
    ],
    ids=["image", "service-account", "priority-class", "pull-secret"],
)
def test_operator_refuses_a_pool_the_policy_forbids(spec, field, policed_operator, operator, api, redis_server):
    api.create_pool(_pool("bad", redis_server.port, **spec))
    _refused(api, "bad", field)
    assert api.deployment(manifests.deployment_name("bad")) is None


def _deployment(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "c", "image": "example.invalid/theirs:1"}]}}},
    }


def test_operator_touches_no_deployment_it_does_not_own(
    policed_operator, operator, api, author, k8s_cluster, k8s_namespace, redis_server, redis_client
):
    k8s_cluster.apply([_deployment("payments"), _deployment("seg-worker")], namespace=k8s_namespace)
    # Someone else's model server: the pool asks to scale it, the operator does not.
    pool = _pool("ms", redis_server.port, redis={"host": "127.0.0.1", "port": redis_server.port},
                 modelServer={"deployment": {"name": "payments", "replicas": 3}})
    assert create_as(k8s_cluster, k8s_namespace, pool).returncode == 0
    protocol.submit_job(redis_client, "segmentation", "uploads/a.tif", "segmentation", "1")
    events = api.wait_events("ms", "PolicyViolation", timeout=T)
    assert any("spec.modelServer.deployment.name" in e["message"] for e in events), events
    assert api.replicas("payments") == 0
    # An existing unowned <pool>-worker is neither replaced nor scaled.
    api.create_pool(_pool("seg", redis_server.port, redis={"host": "127.0.0.1", "port": redis_server.port}))
    _refused(api, "seg", "not owned by ConsumerPool 'seg'")
    theirs = api.deployment("seg-worker")
    assert theirs["spec"]["template"]["spec"]["containers"][0]["image"] == "example.invalid/theirs:1"
    assert not theirs["metadata"].get("ownerReferences") and theirs["spec"]["replicas"] == 0
    # Not vacuous: once the model server opts in with the label, it is scaled with the queue.
    api.patch_deployment("payments", {"metadata": {"labels": {policy.MODEL_SERVER_LABEL: "true"}}})
    wait_for(lambda: api.replicas("payments") == 3, T, "the opted-in model server scaled to 3")


def test_worker_pods_are_admitted_under_restricted_pod_security(
    policed_operator, operator, api, k8s_cluster, k8s_namespace, redis_server
):
    k8s_cluster.request(
        "PATCH", f"/api/v1/namespaces/{k8s_namespace}",
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
        content_type="application/merge-patch+json",
    )
    # Not vacuous: PodSecurity admission refuses the pod the operator rendered before (no securityContext).
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
             "spec": {"containers": [{"name": "worker", "image": IMAGE}]}}
    with pytest.raises(ApiError, match="violates PodSecurity"):
        k8s_cluster.request("POST", f"/api/v1/namespaces/{k8s_namespace}/pods", plain)
    api.create_pool(_pool("seg", redis_server.port, redis={"host": "127.0.0.1", "port": redis_server.port},
                          scaling={"minWorkers": 1}))
    pods = wait_for(lambda: api.pods(manifests.label_selector("seg")), T, "a worker pod admitted")
    spec = pods[0]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert not any(v.get("projected") for v in spec.get("volumes", [])), "no service account token volume"


def _restart(operator: Any, monkeypatch: pytest.MonkeyPatch, admin_policy: dict[str, Any]) -> None:
    """What ``helm upgrade`` with new ``policy:`` values does: the operator restarts with a new KIOSK_POLICY."""
    operator.stop()
    monkeypatch.setenv(policy.POLICY_ENV, json.dumps(admin_policy))
    operator.start()


def test_a_pool_refused_after_it_has_workers_is_scaled_to_zero_and_restored(
    policed_operator, operator, api, k8s_cluster, k8s_namespace, redis_server, monkeypatch
):
    """Tightening the policy stops the old pods (Deployment kept at 0); lifting it brings them back."""
    redis = {"host": "127.0.0.1", "port": redis_server.port}
    api.create_pool(_pool("seg", redis_server.port, redis=redis, scaling={"minWorkers": 2}))
    worker, selector = manifests.deployment_name("seg"), manifests.label_selector("seg")
    wait_for(lambda: api.replicas(worker) == 2, T, "the allowed pool's workers")
    wait_for(lambda: len(api.pods(selector)) == 2, T, "two worker pods")
    theirs = _deployment("other-worker")
    theirs["spec"]["replicas"] = 1
    k8s_cluster.apply([theirs], namespace=k8s_namespace)

    _restart(operator, monkeypatch, {**POLICY, "allowedImagePrefixes": ["registry.example.com/approved/"]})
    wait_for(lambda: api.replicas(worker) == 0, T, "the refused pool's workers scaled to 0")
    found = _refused(api, "seg", "spec.worker.image")
    assert "\n" not in found["message"] and api.condition("seg", "ScalingActive")["status"] == "False"
    events = api.wait_events("seg", "DeploymentScaledDown", timeout=T)
    assert any("scaled from 2 to 0" in e["message"] and "spec.worker.image" in e["message"] for e in events), events
    wait_for(lambda: not [p for p in api.pods(selector) if not p["metadata"].get("deletionTimestamp")],
             T, "the old worker pods gone")
    kept = api.deployment(worker)
    assert kept is not None and policy.owned_by(kept, api.pool("seg")), "the Deployment is kept, still owned"
    # A refused pool whose <pool>-worker is someone else's: its condition is written after the
    # stand-down step, and that Deployment keeps its replicas.
    api.create_pool(_pool("other", redis_server.port, redis=redis, scaling={"minWorkers": 1}))
    _refused(api, "other", "spec.worker.image")
    assert api.replicas("other-worker") == 1
    assert not [e for e in api.events("other") if e["reason"] == "DeploymentScaledDown"]

    _restart(operator, monkeypatch, POLICY)
    wait_for(lambda: api.replicas(worker) == 2, T, "the workers restored once the refusal is lifted")
    wait_for(lambda: (api.condition("seg", "Ready") or {}).get("status") == "True", T, "the pool Ready again")
    assert api.replicas("other-worker") == 1


@pytest.fixture
def loopback_redis_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requested before ``operator``: the test policy, with the loopback Redis an allowed password host."""
    monkeypatch.setenv(policy.POLICY_ENV, json.dumps({**POLICY, "allowedRedisHosts": ["127.0.0.1"]}))


@pytest.fixture
def password_redis() -> Iterator[RedisServer]:
    server = RedisServer(password="s3cret").start()
    try:
        yield server
    finally:
        server.cleanup()


def test_a_secret_losing_its_opt_in_label_stops_the_pools_workers(
    loopback_redis_policy, operator, api, k8s_cluster, k8s_namespace, password_redis
):
    """No restart needed: the label is checked every cycle (the Secret cached up to 30 s); putting it back
    restores the workers."""
    k8s_cluster.apply([_secret("redis-pw", True)], namespace=k8s_namespace)
    redis = {"host": "127.0.0.1", "port": password_redis.port,
             "passwordSecretRef": {"name": "redis-pw", "key": "password"}}
    api.create_pool(_pool("seg", password_redis.port, redis=redis, scaling={"minWorkers": 2}))
    worker = manifests.deployment_name("seg")
    wait_for(lambda: api.replicas(worker) == 2, T, "the pool's workers")
    wait_for(lambda: (api.condition("seg", "Ready") or {}).get("status") == "True", T, "the pool Ready")

    def label(value: str | None) -> None:
        k8s_cluster.request("PATCH", f"/api/v1/namespaces/{k8s_namespace}/secrets/redis-pw",
                            {"metadata": {"labels": {policy.SECRET_LABEL: value}}},
                            content_type="application/merge-patch+json")

    label(None)
    wait_for(lambda: api.replicas(worker) == 0, T, "the workers scaled to 0")
    _refused(api, "seg", "spec.redis.passwordSecretRef")
    events = api.wait_events("seg", "DeploymentScaledDown", timeout=T)
    assert any("spec.redis.passwordSecretRef" in e["message"] for e in events), events
    assert api.deployment(worker) is not None
    label("true")
    wait_for(lambda: api.replicas(worker) == 2, T, "the workers restored once the Secret opts in again")
    wait_for(lambda: (api.condition("seg", "Ready") or {}).get("status") == "True", T, "the pool Ready again")
