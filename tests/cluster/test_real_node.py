"""The real node: a kubelet + containerd + kube-proxy (harness.cluster.realnode) runs real
containers; nothing here is simulated.

Containers run the node's own pause binary (tools/node/pause.c), whose modes (exit, ignore
SIGTERM, record SIGTERM, allocate memory, TCP request) cover what these tests need without a
shell or libc in the image. Pods carry the node's toleration and node selector: the node is
tainted so that the kwok-node tests' pods never land on it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch

from harness.cluster import ApiError, LocalCluster
from harness.cluster import realnode_host as host
from harness.cluster.netns import HOST_IP, NETNS_PATH
from harness.cluster.realnode import NODE_NAME, NODE_SELECTOR, TOLERATION, RealNode
from harness.wait import wait_for

TIMEOUT = 90


@pytest.fixture
def ns(real_node_cluster: LocalCluster, k8s_namespace: str) -> str:
    return k8s_namespace


def _pause(c: LocalCluster) -> str:
    assert c.real_node is not None
    return c.real_node.pause_ref


def _pod(c: LocalCluster, name: str, args: list[str], **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": _pause(c), "imagePullPolicy": "Never", "args": args}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "nodeSelector": NODE_SELECTOR, "tolerations": [TOLERATION],
                 "terminationGracePeriodSeconds": 30, "containers": [container], **spec},
    }


def _create(c: LocalCluster, ns: str, pod: dict[str, Any]) -> dict[str, Any]:
    return c.request("POST", f"/api/v1/namespaces/{ns}/pods", pod)


def _get(c: LocalCluster, ns: str, name: str) -> dict[str, Any]:
    return c.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def _wait_phase(c: LocalCluster, ns: str, name: str, *phases: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        pod = _get(c, ns, name)
        return pod if pod.get("status", {}).get("phase") in phases else None

    return wait_for(done, TIMEOUT, f"pod {ns}/{name} in phase {phases}", ignore=(ApiError,))


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod["status"].get("containerStatuses") or []
    assert statuses, pod["status"]
    return statuses[0]["state"].get("terminated") or {}


def _logs(c: LocalCluster, ns: str, name: str) -> str:
    """Container logs: API server -> kubelet on the node (its serving and client certificates)."""
    return c.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}/log") or ""


def _delete_and_watch(c: LocalCluster, ns: str, name: str) -> list[dict[str, Any]]:
    """Delete the pod and return every version of it seen until it is gone (the kubelet reports
    the container's exit before the pod object disappears)."""
    rv = _get(c, ns, name)["metadata"]["resourceVersion"]
    c.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}")
    seen: list[dict[str, Any]] = []
    with c.api_client() as api_client:
        core = k8s_client.CoreV1Api(api_client)
        w = k8s_watch.Watch()
        for ev in w.stream(core.list_namespaced_pod, ns, field_selector=f"metadata.name={name}",
                           resource_version=rv, timeout_seconds=TIMEOUT):
            seen.append(ev["raw_object"])
            if ev["type"] == "DELETED":
                w.stop()
    assert seen and seen[-1]["metadata"].get("deletionTimestamp"), "the pod was not deleted in time"
    return seen


def _last_terminated(versions: list[dict[str, Any]]) -> dict[str, Any]:
    for pod in reversed(versions):
        for st in pod.get("status", {}).get("containerStatuses") or []:
            if st["state"].get("terminated"):
                return st["state"]["terminated"]
    raise AssertionError(f"no terminated container state among {len(versions)} versions of the pod")


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- tests


def test_node_is_real_and_tainted(real_node_cluster: LocalCluster) -> None:
    node = real_node_cluster.get(f"/api/v1/nodes/{NODE_NAME}")
    info = node["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert node["metadata"]["labels"].get(TOLERATION["key"]) == "true"
    taints = node["spec"]["taints"]
    assert {"key": TOLERATION["key"], "value": "true", "effect": "NoSchedule"} in taints
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == "10.250.0.2"


def test_pod_runs_to_completion(real_node_cluster: LocalCluster, ns: str) -> None:
    c = real_node_cluster
    _create(c, ns, _pod(c, "ok", ["exit", "0"]))
    _create(c, ns, _pod(c, "fails", ["exit", "3"]))
    ok = _wait_phase(c, ns, "ok", "Succeeded", "Failed")
    assert ok["status"]["phase"] == "Succeeded", ok["status"]
    assert ok["spec"]["nodeName"] == NODE_NAME
    assert _terminated(ok)["exitCode"] == 0 and _terminated(ok)["reason"] == "Completed"
    assert ok["status"]["podIP"].startswith("10.251.0.")
    fails = _wait_phase(c, ns, "fails", "Succeeded", "Failed")
    assert fails["status"]["phase"] == "Failed"
    assert _terminated(fails)["exitCode"] == 3


def test_sigterm_reaches_the_container_on_delete(real_node_cluster: LocalCluster, ns: str) -> None:
    c = real_node_cluster
    with tempfile.TemporaryDirectory(prefix="kiosk-sigterm-") as out:
        os.chmod(out, 0o777)
        pod = _pod(c, "term", ["term-file", "/out/term"],
                   volumes=[{"name": "out", "hostPath": {"path": out, "type": "Directory"}}],
                   container={"volumeMounts": [{"name": "out", "mountPath": "/out"}]})
        _create(c, ns, pod)
        _wait_phase(c, ns, "term", "Running")
        versions = _delete_and_watch(c, ns, "term")
        assert (Path(out) / "term").read_text() == "TERM\n"
    term = _last_terminated(versions)
    assert term["exitCode"] == 0, term  # it exited on its own after SIGTERM


def test_pod_ignoring_sigterm_is_killed_at_its_grace_period(real_node_cluster: LocalCluster, ns: str) -> None:
    c = real_node_cluster
    grace = 3
    _create(c, ns, _pod(c, "stubborn", ["ignore-term"], terminationGracePeriodSeconds=grace))
    _wait_phase(c, ns, "stubborn", "Running")
    versions = _delete_and_watch(c, ns, "stubborn")
    term = _last_terminated(versions)
    assert term["exitCode"] == 137, term  # SIGKILL
    deleted = next(v for v in versions if v["metadata"].get("deletionTimestamp"))
    # deletionTimestamp = time of the delete + grace: it was not killed before then (1 s resolution).
    assert (_ts(term["finishedAt"]) - _ts(deleted["metadata"]["deletionTimestamp"])).total_seconds() >= -1


def test_pod_over_its_memory_limit_is_oomkilled(real_node_cluster: LocalCluster, ns: str) -> None:
    c = real_node_cluster
    _create(c, ns, _pod(c, "hog", ["alloc", "256"],
                        container={"resources": {"limits": {"memory": "32Mi"}, "requests": {"memory": "32Mi"}}}))
    pod = _wait_phase(c, ns, "hog", "Failed", "Succeeded", "Running")
    pod = wait_for(lambda: (p := _get(c, ns, "hog"))["status"]["phase"] != "Running" and p, TIMEOUT,
                   "the memory hog to end")
    term = _terminated(pod)
    assert pod["status"]["phase"] == "Failed"
    assert (term["reason"], term["exitCode"]) == ("OOMKilled", 137), term


def test_restricted_pod_runs(real_node_cluster: LocalCluster, ns: str) -> None:
    c = real_node_cluster
    c.request("PATCH", f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}}, content_type="application/merge-patch+json")
    with pytest.raises(ApiError) as rejected:  # Pod Security admission is really enforcing
        _create(c, ns, _pod(c, "loose", ["exit", "0"]))
    assert rejected.value.status == 403
    restricted = _pod(c, "tight", ["exit", "0"],
                      securityContext={"runAsNonRoot": True, "runAsUser": 65535, "runAsGroup": 65535,
                                       "seccompProfile": {"type": "RuntimeDefault"}},
                      container={"securityContext": {"allowPrivilegeEscalation": False,
                                                     "readOnlyRootFilesystem": True,
                                                     "capabilities": {"drop": ["ALL"]}}})
    _create(c, ns, restricted)
    pod = _wait_phase(c, ns, "tight", "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Succeeded", pod["status"]


def test_job_with_five_pods_completes(real_node_cluster: LocalCluster, ns: str) -> None:
    c = real_node_cluster
    template = _pod(c, "x", ["exit", "0"])
    template.pop("apiVersion"), template.pop("kind")
    template["metadata"] = {"labels": {"app": "five"}}
    c.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "five"},
        "spec": {"completions": 5, "parallelism": 5, "backoffLimit": 0, "template": template}})

    def complete() -> dict[str, Any] | None:
        job = c.get(f"/apis/batch/v1/namespaces/{ns}/jobs/five")
        conds = {x["type"]: x["status"] for x in job.get("status", {}).get("conditions", [])}
        assert conds.get("Failed") != "True", job["status"]
        return job if conds.get("Complete") == "True" else None

    job = wait_for(complete, TIMEOUT * 2, "job five Complete", ignore=(ApiError,))
    assert job["status"]["succeeded"] == 5
    pods = c.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="app=five")["items"]
    assert len(pods) == 5 and {p["spec"]["nodeName"] for p in pods} == {NODE_NAME}


def test_pod_reaches_the_api_server_through_the_kubernetes_service(real_node_cluster: LocalCluster, ns: str) -> None:
    c = real_node_cluster
    # Plain HTTP to the HTTPS port: only a Go TLS server answers with this sentence, so the pod
    # reached the API server through 10.96.0.1:443 (kube-proxy's rules on the node).
    _create(c, ns, _pod(c, "svc", ["connect", "10.96.0.1", "443", "GET /version HTTP/1.0\r\n\r\n"]))
    pod = _wait_phase(c, ns, "svc", "Succeeded", "Failed")
    logs = _logs(c, ns, "svc")
    assert pod["status"]["phase"] == "Succeeded", logs
    assert "Client sent an HTTP request to an HTTPS server" in logs, logs


IN_CLUSTER_WHOAMI = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
url = "https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
req = urllib.request.Request(url, data=body, method="POST", headers={
    "Authorization": "Bearer " + open(sa + "/token").read(), "Content-Type": "application/json"})
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
print(json.load(urllib.request.urlopen(req, context=ctx, timeout=20))["status"]["userInfo"]["username"])
"""


def test_pod_uses_in_cluster_config_through_the_service(real_node_cluster: LocalCluster, ns: str) -> None:
    """What the operator pod does: ServiceAccount token + CA, KUBERNETES_SERVICE_HOST, TLS verified."""
    from harness.images import ensure_image

    c = real_node_cluster
    assert c.real_node is not None
    base = ensure_image("base")  # python3 on Debian; imported once per node
    if base.ref not in c.real_node.images():
        c.real_node.import_image(base.archive)
    pod = _pod(c, "whoami", [], container={"image": base.ref, "command": ["python3", "-c", IN_CLUSTER_WHOAMI]})
    _create(c, ns, pod)
    pod = _wait_phase(c, ns, "whoami", "Succeeded", "Failed")
    logs = _logs(c, ns, "whoami")
    assert pod["status"]["phase"] == "Succeeded", logs
    assert logs.strip() == f"system:serviceaccount:{ns}:default"


@pytest.fixture
def host_server() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on HOST_IP answering ``pong <what it got>``; yields (port, messages received)."""
    srv = socket.create_server((HOST_IP, 0))
    srv.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(10)
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                got.append(data)
                conn.sendall(b"pong " + data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], got
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_pod_reaches_a_server_on_the_host_ip(real_node_cluster: LocalCluster, ns: str,
                                             host_server: tuple[int, list[bytes]]) -> None:
    c = real_node_cluster
    port, got = host_server
    token = uuid.uuid4().hex
    _create(c, ns, _pod(c, "hostcall", ["connect", HOST_IP, str(port), token]))
    pod = _wait_phase(c, ns, "hostcall", "Succeeded", "Failed")
    logs = _logs(c, ns, "hostcall")
    assert pod["status"]["phase"] == "Succeeded", logs
    assert token.encode() in got
    assert f"pong {token}" in logs


def _machine_snapshot() -> dict[str, Any]:
    return {
        "sysctls": host.read_sysctls(),
        "links": sorted(os.listdir("/sys/class/net")),
        "netns": NETNS_PATH.exists(),
        "cgroups": [str(d) for d in host.cgroup_dirs()],
    }


def test_teardown_leaves_the_machine_as_it_was(k8s_cluster: LocalCluster) -> None:
    """Start, run a pod, stop: nothing stays. Then a crash (processes SIGKILLed, nothing cleaned):
    the next start cleans up and its stop leaves nothing either."""
    c = k8s_cluster
    if c.real_node is not None:
        c.stop_real_node()
    before = _machine_snapshot()
    assert not before["netns"] and not before["cgroups"], before

    node = c.start_real_node()
    # The kubelet's values (on this machine kind they differ from the host's, so restoring matters).
    assert host.read_sysctls() == {"vm.overcommit_memory": "1", "kernel.panic": "10", "kernel.panic_on_oops": "1"}
    ns = c.create_namespace(f"teardown-{uuid.uuid4().hex[:6]}")
    try:
        _create(c, ns, _pod(c, "ok", ["exit", "0"]))
        _create(c, ns, _pod(c, "running", []))
        _wait_phase(c, ns, "ok", "Succeeded")
        _wait_phase(c, ns, "running", "Running")
        assert host.mounts_under(node.run_dir) and host.cgroup_dirs()
        c.stop_real_node()
        assert node.leftovers() == []
        assert _machine_snapshot() == before

        # A crash: everything SIGKILLed, no cleanup; the lock dies with the process.
        node = c.start_real_node()
        _create(c, ns, _pod(c, "running2", []))
        _wait_phase(c, ns, "running2", "Running")
        for p in node.procs:
            os.kill(p.pid, 9)
            if p.popen is not None:
                p.popen.wait(10)
        node._unlock()
        c.real_node = None
        assert node.leftovers(), "the crash left nothing to clean up"
        node2 = RealNode()
        node2.cleanup()
        assert node2.leftovers() == []
        assert _machine_snapshot() == before
        c.request("DELETE", f"/api/v1/nodes/{NODE_NAME}")  # the crashed node's object (as stop() does)
    finally:
        c.delete_namespace(ns)
        if c.real_node is not None:
            c.stop_real_node()
    assert _machine_snapshot() == before


def test_a_machine_without_the_node_packages_fails_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from harness.cluster.netns import NodeUnsupported, check_tools

    monkeypatch.setenv("PATH", str(tmp_path))  # no ip, containerd, runc, buildah, ... on it
    with pytest.raises(NodeUnsupported) as exc:
        check_tools()
    msg = str(exc.value)
    assert "\n" not in msg and "containerd" in msg and "runc" in msg, msg
