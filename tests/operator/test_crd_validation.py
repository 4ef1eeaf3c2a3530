"""The ConsumerPool CRD on the real API server: defaults, explain, and invalid pools rejected."""

from __future__ import annotations

import copy

import pytest

from harness.cluster import ApiError, ClusterError
from harness.operator_process import POOLS
from harness.wait import wait_for
from kiosk_operator.crd import apply_defaults, spec_schema
from kiosk_operator.spec import parse_spec

pytestmark = pytest.mark.cluster

VALID = {
    "apiVersion": "kiosk.deepcell.org/v1alpha1",
    "kind": "ConsumerPool",
    "metadata": {"name": "p"},
    "spec": {"queues": ["segmentation"], "worker": {"image": "kiosk-worker:1"}},
}

# (id, change applied to spec, text the API server's message must contain)
INVALID = [
    ("no-queues", {"queues": None}, "spec.queues"),
    ("empty-queues", {"queues": []}, "spec.queues"),
    ("queue-with-colon", {"queues": ["a:b"]}, "spec.queues[0]"),
    ("duplicate-queues", {"queues": ["a", "a"]}, "spec.queues[1]"),
    ("no-worker", {"worker": None}, "spec.worker"),
    ("no-image", {"worker": {"imagePullPolicy": "Always"}}, "spec.worker.image"),
    (
        "pull-policy",
        {"worker": {"image": "x", "imagePullPolicy": "Sometimes"}},
        "spec.worker.imagePullPolicy",
    ),
    ("grace-too-long", {"worker": {"image": "x", "graceSeconds": 60}}, "spec.worker.graceSeconds"),
    ("min-above-max", {"scaling": {"minWorkers": 5, "maxWorkers": 2}}, "spec.scaling.minWorkers"),
    ("bad-mode", {"scaling": {"mode": "Pod"}}, "spec.scaling.mode"),
    ("negative-max", {"scaling": {"maxWorkers": -1}}, "spec.scaling.maxWorkers"),
    ("zero-items-per-worker", {"scaling": {"itemsPerWorker": 0}}, "spec.scaling.itemsPerWorker"),
    (
        "polling-too-fast",
        {"scaling": {"pollingIntervalSeconds": 0.01}},
        "spec.scaling.pollingIntervalSeconds",
    ),
    ("zero-batch", {"scaling": {"batchSize": 0}}, "spec.scaling.batchSize"),
    ("negative-backoff", {"scaling": {"job": {"backoffLimit": -1}}}, "spec.scaling.job.backoffLimit"),
    ("port-too-big", {"redis": {"port": 70000}}, "spec.redis.port"),
    (
        "secret-without-key",
        {"redis": {"passwordSecretRef": {"name": "x"}}},
        "spec.redis.passwordSecretRef.key",
    ),
    (
        "tls-secret-without-tls",
        {"redis": {"tlsSecretRef": {"name": "redis-tls"}}},
        "spec.redis.tlsSecretRef needs spec.redis.tls",
    ),
    ("tls-secret-without-name", {"redis": {"tls": True, "tlsSecretRef": {}}}, "spec.redis.tlsSecretRef.name"),
    (
        "sentinel-not-host-port",
        {"redis": {"sentinel": {"hosts": ["nohost"]}}},
        "spec.redis.sentinel.hosts[0]",
    ),
    ("bucket-scheme", {"storage": {"bucket": "ftp://x"}}, "spec.storage.bucket"),
    (
        "model-server-replicas",
        {"modelServer": {"deployment": {"name": "tfs", "replicas": 0}}},
        "spec.modelServer.deployment.replicas",
    ),
    ("consumer-type", {"consumerType": "Bad Type"}, "spec.consumerType"),
    (
        "tolerations-operator",
        {"worker": {"image": "x", "tolerations": [{"operator": "Maybe"}]}},
        "spec.worker.tolerations[0].operator",
    ),
]


def _pool(change: dict) -> dict:
    body = copy.deepcopy(VALID)
    for key, value in change.items():
        if value is None:
            body["spec"].pop(key, None)
        else:
            body["spec"][key] = value
    return body


@pytest.mark.parametrize("change,field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_pool_rejected_naming_the_field(k8s_cluster, k8s_namespace, crd, change, field):
    with pytest.raises(ApiError) as err:
        k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), _pool(change))
    assert err.value.status == 422, err.value.body
    assert field in err.value.body, err.value.body


def test_valid_pool_gets_defaults(k8s_cluster, k8s_namespace, crd):
    created = k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), copy.deepcopy(VALID))
    spec = created["spec"]
    assert spec["consumerType"] == "segmentation"
    assert spec["scaling"]["mode"] == "Deployment" and spec["scaling"]["maxWorkers"] == 1
    assert spec["scaling"]["job"]["backoffLimit"] == 0
    assert spec["redis"] == {"host": "redis-master", "port": 6379, "tls": False}
    assert spec["worker"]["graceSeconds"] == 25 and spec["worker"]["terminationGracePeriodSeconds"] == 30
    assert spec["reclaim"] == {"enabled": True, "legacyProcessingLists": False}


def test_tls_secret_ref_gets_defaults(k8s_cluster, k8s_namespace, crd):
    body = copy.deepcopy(VALID)
    body["spec"]["redis"] = {"tls": True, "tlsSecretRef": {"name": "redis-tls"}}
    created = k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), body)
    assert created["spec"]["redis"]["tlsSecretRef"] == {"name": "redis-tls", "clientCertificate": False}


# (id, spec fields set over VALID's): local mode must default a pool file as the API server does.
DEFAULTING = [
    ("minimal", {}),
    (
        "optional-objects",
        {
            "redis": {"tls": True, "tlsSecretRef": {"name": "t"}, "sentinel": {"hosts": ["s1:26379"]}},
            "modelServer": {"deployment": {"name": "tfs"}},
            "storage": {"credentialsSecretRef": {"name": "gcs"}},
        },
    ),
    (
        "partial-sections",
        {
            "worker": {
                "image": "x",
                "env": [{"name": "A", "value": "1"}],
                "tolerations": [{"key": "k", "operator": "Exists"}],
                "resources": {"limits": {"cpu": "1"}},
            },
            "scaling": {"mode": "Job", "maxWorkers": 4, "job": {"backoffLimit": 2}},
            "reclaim": {"enabled": False},
        },
    ),
    ("nulls", {"redis": None, "scaling": {"job": None, "cooldownSeconds": None}, "storage": {"bucket": None}}),
]


@pytest.mark.parametrize("change", [d[1] for d in DEFAULTING], ids=[d[0] for d in DEFAULTING])
def test_local_defaults_are_the_api_servers(k8s_cluster, k8s_namespace, crd, change):
    body = copy.deepcopy(VALID)
    body["spec"].update(copy.deepcopy(change))
    created = k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), copy.deepcopy(body))
    assert created["spec"] == apply_defaults(body["spec"], spec_schema())
    assert parse_spec(created["spec"]) == parse_spec(body["spec"])


def test_scale_subresource_sets_the_ceiling(k8s_cluster, k8s_namespace, crd):
    k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), copy.deepcopy(VALID))
    pool = POOLS.format(ns=k8s_namespace) + "/p"
    path = pool + "/scale"
    k8s_cluster.request("PATCH", path, {"spec": {"replicas": 0}}, content_type="application/merge-patch+json")
    assert k8s_cluster.get(pool)["spec"]["scaling"]["maxWorkers"] == 0
    k8s_cluster.kubectl("scale", "cpool", "p", "-n", k8s_namespace, "--replicas=4")
    assert k8s_cluster.get(pool)["spec"]["scaling"]["maxWorkers"] == 4
    # The scale's status.replicas is the ceiling the operator applied, never the worker count.
    status = {"workers": 2, "maxWorkers": 4, "selector": "kiosk.deepcell.org/pool=p"}
    k8s_cluster.request("PATCH", pool + "/status", {"status": status}, content_type="application/merge-patch+json")
    scale = k8s_cluster.get(path)
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (4, 4), scale
    assert scale["status"]["selector"] == "kiosk.deepcell.org/pool=p"
    # kubectl scale's precondition compares with the ceiling, too.
    k8s_cluster.kubectl("scale", "cpool", "p", "-n", k8s_namespace, "--current-replicas=4", "--replicas=1")
    assert k8s_cluster.get(pool)["spec"]["scaling"]["maxWorkers"] == 1


def test_kubectl_explain_teaches_the_fields(k8s_cluster, crd):
    def explain(field: str) -> str:
        # The OpenAPI document lags the CRD becoming Established by a moment.
        out = wait_for(
            lambda: k8s_cluster.kubectl("explain", field).stdout,
            30,
            f"kubectl explain {field}",
            ignore=(ClusterError,),
        )
        return " ".join(out.split())

    assert "workers = ceil(depth / itemsPerWorker)" in explain("consumerpool.spec.scaling.itemsPerWorker")
    assert "by reference only" in explain("cpool.spec.redis.passwordSecretRef")


def test_printer_columns(k8s_cluster, k8s_namespace, crd):
    k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), copy.deepcopy(VALID))
    header = k8s_cluster.kubectl("get", "cpool", "-n", k8s_namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "PENDING", "IN-FLIGHT", "WORKERS", "DESIRED", "MODE", "AGE"]
