"""The harness's kubelet player on the real cluster: kwok makes pods Running, the player runs them.

Hand-written Deployments, Jobs and Pods (no operator): env resolution from the pod spec and the API,
worker processes named after their pods, SIGTERM on deletion and SIGKILL after the grace period,
Job pods reported Succeeded/Failed so the Job controller completes the Job.
"""

from __future__ import annotations

import json

import pytest
from e2e_support import statuses, submit_cells

import kiosk_protocol as protocol
from harness.cluster import HARNESS_KUBELET_LABEL
from harness.kubelet import PodEnvError, container_argv, expand, pod_env
from harness.wait import wait_for

TIMEOUT = 60


def _worker_container(redis_server, model_server, *, args: list[str] | None = None) -> dict:
    container = {
        "name": "worker",
        "image": "example.invalid/kiosk-worker:test",
        "envFrom": [{"configMapRef": {"name": "worker-settings"}}],
        "env": [
            {"name": "WORKER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "REDIS_HOST", "value": "127.0.0.1"},
            {"name": "REDIS_PORT", "value": str(redis_server.port)},
            {"name": "TF_HOST", "value": "127.0.0.1"},
            {"name": "TF_PORT", "valueFrom": {"configMapKeyRef": {"name": "worker-settings-keys",
                                                                  "key": "tf-port"}}},
            {"name": "STORAGE_BUCKET", "valueFrom": {"secretKeyRef": {"name": "storage", "key": "bucket"}}},
            {"name": "OPTIONAL_MISSING", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k",
                                                                        "optional": True}}},
            {"name": "DESCRIPTION", "value": "worker in $(POD_NAMESPACE), $$(literal)"},
        ],
    }
    if args:
        container["args"] = args
    return container


@pytest.fixture()
def worker_config(k8s_cluster, k8s_namespace, e2e_model_server, bucket):
    """ConfigMaps and the Secret the worker pods read their settings from."""
    ns = k8s_namespace
    k8s_cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "worker-settings"},
             "data": {"QUEUE": "segmentation", "CONSUMER_TYPE": "segmentation", "EMPTY_QUEUE_TIMEOUT": "0.5",
                      "HEARTBEAT_INTERVAL": "0.3", "GRACE_PERIOD": "5", "MAX_RETRY": "2"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "worker-settings-keys"},
             "data": {"tf-port": str(e2e_model_server.port)}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "storage"},
             "stringData": {"bucket": f"file://{bucket}"}},
        ]}), namespace=ns)


def test_pod_env_is_built_like_the_kubelet():
    pod = {
        "metadata": {"name": "p-1", "namespace": "ns", "uid": "u", "labels": {"a": "b"}},
        "spec": {"nodeName": "n1", "containers": [{
            "name": "c",
            "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"},
                        {"secretRef": {"name": "absent", "optional": True}}],
            "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "value": "$(A)-$(CM_X)-$(UNKNOWN)-$$(A)"},
                {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['a']"}}},
                {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k"}}},
                {"name": "CM_X", "value": "override"},
            ],
            "args": ["--x", "$(A)"],
        }]},
    }
    data = {("ConfigMap", "cm"): {"X": "from-cm"}, ("Secret", "sec"): {"k": "secret"}}
    env = pod_env(pod, lambda kind, name: data.get((kind, name)))
    assert env == {"HOSTNAME": "p-1", "CM_X": "override", "A": "1", "B": "1-from-cm-$(UNKNOWN)-$(A)",
                   "L": "b", "N": "n1", "S": "secret"}
    assert container_argv(pod, env, ["kiosk-worker"]) == ["kiosk-worker", "--x", "1"]
    assert expand("$$$(A)", {"A": "x"}) == "$x"
    with pytest.raises(PodEnvError, match="key 'k' in Secret 'sec' not found"):
        pod_env(pod, lambda kind, name: {} if kind == "Secret" else data.get((kind, name)))


def test_deployment_pods_run_as_worker_processes(k8s_cluster, k8s_namespace, redis_server, redis_client,
                                                 e2e_model_server, bucket, worker_config, kubelet):
    ns = k8s_namespace
    player = kubelet("app=kp-worker", {"LOG_LEVEL": "DEBUG"})
    k8s_cluster.apply(json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kp-worker"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "kp-worker"}},
                 "template": {"metadata": {"labels": {"app": "kp-worker"}},
                              "spec": {"terminationGracePeriodSeconds": 10,
                                       "containers": [_worker_container(redis_server, e2e_model_server)]}}},
    }), namespace=ns)

    procs = wait_for(lambda: len(player.running()) == 2 and player.running(), TIMEOUT, "2 worker processes")
    pods = {p["metadata"]["name"] for p in k8s_cluster.get(f"/api/v1/namespaces/{ns}/pods",
                                                           labelSelector="app=kp-worker")["items"]}
    assert {p.pod for p in procs} == pods
    for p in procs:
        assert p.env["WORKER_NAME"] == p.env["HOSTNAME"] == p.pod
        assert p.env["STORAGE_BUCKET"] == f"file://{bucket}"            # secretKeyRef
        assert p.env["TF_PORT"] == str(e2e_model_server.port)          # configMapKeyRef
        assert p.env["QUEUE"] == "segmentation"                        # envFrom
        assert p.env["DESCRIPTION"] == f"worker in {ns}, $(literal)"   # $(VAR) expansion
        assert p.env["LOG_LEVEL"] == "DEBUG" and "OPTIONAL_MISSING" not in p.env
        assert p.argv[0].endswith("/kiosk-worker")

    # Both register in Redis under their pod names, and jobs are done by them.
    registered = lambda: {w.decode() if isinstance(w, bytes) else w  # noqa: E731
                          for w in redis_client.zrange(protocol.workers_key("segmentation"), 0, -1)}
    wait_for(lambda: registered() == pods, TIMEOUT, f"workers {pods} registered in Redis")
    keys = list(submit_cells(redis_client, bucket, 6))
    wait_for(lambda: statuses(redis_client, keys).get("done") == len(keys), TIMEOUT, "6 jobs done")
    assert {redis_client.hget(k, "identity_started") for k in keys} <= pods

    # Scale to zero: each process gets SIGTERM, drains, exits 0; nothing is restarted.
    k8s_cluster.kubectl("-n", ns, "scale", "deployment/kp-worker", "--replicas=0")
    wait_for(lambda: not player.running(), TIMEOUT, "worker processes stopped")
    wait_for(lambda: all(p.exit_code is not None for p in procs), 10, "exits recorded")
    assert [p.exit_codes for p in procs] == [[0], [0]], player.describe()
    assert all(p.terminating and p.restarts == 0 for p in procs)
    assert "SIGTERM (pod deleted)" in procs[0].log()
    wait_for(lambda: not registered(), 10, "workers unregistered from Redis")


def test_job_pods_report_success_and_failure(k8s_cluster, k8s_namespace, redis_server, redis_client,
                                             e2e_model_server, bucket, worker_config, kubelet):
    ns = k8s_namespace
    player = kubelet("kp-job")
    keys = list(submit_cells(redis_client, bucket, 3, shape=(64, 64), n_cells=4))

    def job(name: str, container: dict) -> dict:
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                "spec": {"backoffLimit": 0, "template": {
                    "metadata": {"labels": {"kp-job": name, HARNESS_KUBELET_LABEL: "harness"}},
                    "spec": {"restartPolicy": "Never", "containers": [container]}}}}

    failing = {"name": "c", "image": "x", "command": ["python", "-c", "import sys; sys.exit(3)"]}
    k8s_cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        job("batch", {**_worker_container(redis_server, e2e_model_server), "command": ["kiosk-worker"],
                      "args": ["--max-jobs", "10"]}),
        job("broken", failing),
    ]}), namespace=ns)

    def condition(name: str) -> str | None:
        status = k8s_cluster.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}").get("status", {})
        return next((c["type"] for c in status.get("conditions", [])
                     if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None)

    finished = wait_for(lambda: condition("batch"), TIMEOUT, "Job batch finished")
    assert finished == "Complete", player.describe()
    assert wait_for(lambda: condition("broken"), TIMEOUT, "Job broken finished") == "Failed"
    assert statuses(redis_client, keys) == {"done": 3}
    by_job = {p.pod.rsplit("-", 1)[0]: p for p in player.processes.values()}
    assert by_job["batch"].exit_code == 0 and by_job["batch"].reported == "Succeeded"
    assert by_job["broken"].exit_code == 3 and by_job["broken"].reported == "Failed"
    pod = k8s_cluster.get(f"/api/v1/namespaces/{ns}/pods/{by_job['broken'].pod}")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_deleted_pod_gets_sigterm_then_sigkill_after_grace(k8s_cluster, k8s_namespace, kubelet):
    ns = k8s_namespace
    player = kubelet("kp=stubborn")
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, lambda *a: print('TERM', flush=True))\n"
                "print('ready', flush=True)\nwhile True: time.sleep(0.05)")
    k8s_cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stubborn", "labels": {"kp": "stubborn"}},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "x", "command": ["python", "-c", stubborn]}]},
    }), namespace=ns)
    proc = wait_for(lambda: player.processes.get("stubborn"), TIMEOUT, "stubborn process")
    wait_for(lambda: "ready" in proc.log(), 20, "process ready")
    k8s_cluster.kubectl("-n", ns, "delete", "pod", "stubborn", "--wait=false")
    wait_for(lambda: proc.exit_code is not None, 20, "process killed")
    assert proc.exit_code == -9 and "TERM" in proc.log() and "SIGKILL" in proc.log()
    wait_for(lambda: not k8s_cluster.exists(f"/api/v1/namespaces/{ns}/pods/stubborn"), 10, "pod gone")
    assert proc.restarts == 0


def test_pod_with_missing_secret_starts_once_it_exists(k8s_cluster, k8s_namespace, kubelet):
    """The kubelet's CreateContainerConfigError: no process until the Secret appears, then it runs."""
    ns = k8s_namespace
    player = kubelet("kp=late")
    k8s_cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late", "labels": {"kp": "late"}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "c", "image": "x",
            "command": ["python", "-c", "import os, time; print('token', os.environ['TOKEN'], flush=True); "
                        "time.sleep(60)"],
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "t"}}}]}]},
    }), namespace=ns)
    err = wait_for(lambda: player.errors.get("late"), TIMEOUT, "start refused for the missing Secret")
    assert "Secret 'late-secret' not found" in err and "late" not in player.processes
    k8s_cluster.apply(json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late-secret"},
                                  "stringData": {"t": "s3cr3t"}}), namespace=ns)
    proc = wait_for(lambda: player.processes.get("late"), TIMEOUT, "process started after the Secret appeared")
    wait_for(lambda: "token s3cr3t" in proc.log(), 20, "process saw the Secret's value")
    assert "late" not in player.errors
