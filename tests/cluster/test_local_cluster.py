"""Smoke tests for the local control plane (etcd, apiserver, controller-manager, scheduler, kwok).

Fixtures k8s_cluster / k8s_namespace come from harness.cluster_fixtures (registered by
tests/conftest.py, or run with `-p harness.cluster_fixtures` and tests/ on sys.path).
"""

from __future__ import annotations

import json

import pytest

from harness.cluster import KWOK_NODE_ANNOTATION, ApiError, LocalCluster
from harness.wait import wait_for

TIMEOUT = 60


def _pods(c: LocalCluster, ns: str, selector: str) -> list:
    return c.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector)["items"]


def _deployment(name: str, replicas: int, resources: dict | None = None) -> dict:
    container = {"name": "main", "image": "example.invalid/app:1"}
    if resources:
        container["resources"] = resources
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [container]}},
        },
    }


def test_nodes_are_ready_with_gpus(k8s_cluster):
    # The kwok nodes only: a real node (if attached) has no GPUs and its own tests.
    nodes = [n for n in k8s_cluster.kubectl_json("get", "nodes")["items"]
             if (n["metadata"].get("annotations") or {}).get(KWOK_NODE_ANNOTATION) == "fake"]
    assert len(nodes) >= 3
    for node in nodes:
        conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert conds["Ready"] == "True"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"


def test_deployment_pods_run_and_are_garbage_collected(k8s_cluster, k8s_namespace):
    c, ns = k8s_cluster, k8s_namespace
    c.apply(json.dumps(_deployment("web", 3, {"limits": {"nvidia.com/gpu": "1"}})), namespace=ns)

    def running():
        pods = _pods(c, ns, "app=web")
        return len(pods) == 3 and all(
            p["status"].get("phase") == "Running" and p["spec"].get("nodeName") for p in pods) and pods

    pods = wait_for(running, TIMEOUT, "3 Running pods of Deployment web")
    assert all(p["spec"]["nodeName"].startswith("kwok-node-") for p in pods)
    wait_for(lambda: c.get(f"/apis/apps/v1/namespaces/{ns}/deployments/web")["status"].get("availableReplicas") == 3,
             TIMEOUT, "Deployment web available=3")
    rs = c.get(f"/apis/apps/v1/namespaces/{ns}/replicasets", labelSelector="app=web")["items"]
    assert len(rs) == 1 and rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"

    c.kubectl("delete", "-n", ns, "deployment", "web", "--wait=false")
    wait_for(lambda: not c.get(f"/apis/apps/v1/namespaces/{ns}/replicasets", labelSelector="app=web")["items"],
             TIMEOUT, "ReplicaSet garbage-collected")
    wait_for(lambda: not _pods(c, ns, "app=web"), TIMEOUT, "pods garbage-collected")


def test_job_pod_succeeds_and_job_completes(k8s_cluster, k8s_namespace):
    c, ns = k8s_cluster, k8s_namespace
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "main", "image": "example.invalid/job:1"}]}}},
    }
    c.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)

    def succeeded():
        pods = _pods(c, ns, "job-name=once")
        return pods and all(p["status"].get("phase") == "Succeeded" for p in pods)

    wait_for(succeeded, TIMEOUT, "Job pod Succeeded")

    def complete():
        conds = c.get(f"/apis/batch/v1/namespaces/{ns}/jobs/once")["status"].get("conditions", [])
        return any(x["type"] == "Complete" and x["status"] == "True" for x in conds)

    wait_for(complete, TIMEOUT, "Job Complete")


def test_job_pod_failure_annotation(k8s_cluster, k8s_namespace):
    c, ns = k8s_cluster, k8s_namespace
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "boom"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"annotations": {"kiosk-operator.test/pod-fail": "true"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "example.invalid/job:1"}]}}},
    }
    c.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)

    def failed():
        conds = c.get(f"/apis/batch/v1/namespaces/{ns}/jobs/boom")["status"].get("conditions", [])
        return any(x["type"] == "Failed" and x["status"] == "True" for x in conds)

    wait_for(failed, TIMEOUT, "Job Failed")


def test_serviceaccount_kubeconfig_has_exactly_its_rbac(k8s_cluster, k8s_namespace):
    c, ns = k8s_cluster, k8s_namespace
    c.kubectl("create", "serviceaccount", "-n", ns, "op")
    kc = c.kubeconfig_for_serviceaccount(ns, "op")

    denied = c.kubectl("get", "pods", "-n", ns, kubeconfig=kc, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    c.kubectl("create", "role", "-n", ns, "pod-reader", "--verb=get,list", "--resource=pods")
    c.kubectl("create", "rolebinding", "-n", ns, "op-pods", "--role=pod-reader", f"--serviceaccount={ns}:op")
    wait_for(lambda: c.kubectl("get", "pods", "-n", ns, kubeconfig=kc, check=False).returncode == 0,
             TIMEOUT, "SA can list pods after RoleBinding")
    other = c.kubectl("get", "pods", "-n", "default", kubeconfig=kc, check=False)
    assert other.returncode != 0 and "forbidden" in other.stderr.lower()

    imp = c.kubeconfig_for_serviceaccount(ns, "op", mode="impersonate")
    assert c.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=imp).stdout \
        == f"system:serviceaccount:{ns}:op"


def test_api_errors_carry_status(k8s_cluster, k8s_namespace):
    with pytest.raises(ApiError) as info:
        k8s_cluster.get(f"/api/v1/namespaces/{k8s_namespace}/pods/missing")
    assert info.value.status == 404
