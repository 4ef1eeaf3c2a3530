"""Helpers for the end-to-end tests on the real node (tests/e2e/test_real_node_e2e*.py).

Everything a pod reaches on the host listens on HOST_IP (the host end of the node's veth):
Redis (``HostRedis``) and the GCS emulator (``HostGcs``, anonymous access, so no Secret is
needed in a ``restricted`` namespace where hostPath buckets are refused). The operator is the
chart's Deployment installed with ``helm`` (``install_operator``); the model server is a
Deployment of the worker image running ``kiosk-model-server`` behind a ClusterIP Service
(there is no cluster DNS: pools name the Service's IP). ``PodLogs`` follows every container
of a pool through the API (``pods/log?follow``), so logs of SIGTERMed, OOM-killed or deleted
pods are kept for the assertions; ``diagnostics`` is what a failing test prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client

from harness.cluster import ApiError, LocalCluster
from harness.cluster.containerd import K8S_NAMESPACE
from harness.cluster.netns import HOST_IP, NodeUnsupported
from harness.cluster.realnode import LABEL, NODE_SELECTOR, TOLERATION
from harness.helm import helm
from harness.images import BuiltImage, ensure_image
from harness.redis_server import RedisServer
from harness.storage_servers import FakeGcsServer
from harness.wait import wait_for
from kiosk_operator.policy import MODEL_SERVER_LABEL

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kiosk-operator"
#: The ``kiosk`` command installed next to this interpreter (the project's venv).
KIOSK_BIN = Path(sys.executable).parent / "kiosk"
RELEASE = "kiosk-operator"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
MODEL_SERVER_PORT = 8500
#: The restricted Pod Security profile, for the pods the tests create themselves (model servers).
RESTRICTED_POD_SC = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                     "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER_SC = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                           "capabilities": {"drop": ["ALL"]}}


# --------------------------------------------------------------------------- host services


class HostRedis(RedisServer):
    """redis-server on 127.0.0.1 (the test's client) and HOST_IP (the pods)."""

    def args(self) -> list[str]:
        args = super().args()
        i = args.index("--bind")
        return [*args[: i + 2], HOST_IP, *args[i + 2:]]


class HostGcs(FakeGcsServer):
    """fake-gcs-server on HOST_IP: the pods and the CLI use the same endpoint (its URLs name it)."""

    name = "fake-gcs-host"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST_IP}:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.binary), "-backend", "memory", "-scheme", "http", "-host", HOST_IP,
            "-port", str(self.port), "-public-host", f"{HOST_IP}:{self.port}",
            "-external-url", self.endpoint, "-log-level", "warn",
        ]


def storage_env(gcs: HostGcs) -> dict[str, str]:
    """What a worker or the CLI needs for the emulator: its endpoint, anonymous (no credentials lookup)."""
    return {"STORAGE_EMULATOR_HOST": gcs.endpoint, "STORAGE_ENDPOINT": gcs.endpoint}


# --------------------------------------------------------------------------- images


def node_image(cluster: LocalCluster, name: str) -> BuiltImage:
    """Build (cached) our image ``name`` and import it into the real node's containerd once."""
    node = cluster.real_node
    assert node is not None, "the real node is not running"
    image = ensure_image(name)
    if image.ref not in node.images():
        node.import_image(image.archive)
    return image


def ctr(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ctr`` against the real node's containerd, namespace k8s.io (the kubelet's containers)."""
    node = cluster.real_node
    assert node is not None, "the real node is not running"
    argv = ["ctr", f"--address={node.lay.socket}", "-n", K8S_NAMESPACE, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def sigkill_container(cluster: LocalCluster, pod: Mapping[str, Any], container: str) -> str:
    """SIGKILL a pod's running container through the runtime (the kernel's way, no kubelet involved);
    returns the container id."""
    for st in pod["status"].get("containerStatuses") or []:
        if st["name"] == container and st.get("state", {}).get("running"):
            cid = st["containerID"].split("://", 1)[1]
            ctr(cluster, "tasks", "kill", "--signal", "SIGKILL", cid)
            return cid
    raise AssertionError(f"container {container} of {pod['metadata']['name']} is not running: {pod['status']}")


# --------------------------------------------------------------------------- helm and the operator




def operator_values(image: BuiltImage, worker_image_prefix: str) -> dict[str, Any]:
    """Chart values for the real node: the built image (never pulled), the node's selector and
    toleration, and a policy that lets pools tolerate the node's taint and run only our worker image.
    Everything else is the chart's default."""
    repository, tag = image.ref.rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "nodeSelector": dict(NODE_SELECTOR),
        "tolerations": [dict(TOLERATION)],
        "operator": {"logJson": False},
        "policy": {"allowedTolerationKeys": ["nvidia.com/gpu", LABEL],
                   "allowedImagePrefixes": [worker_image_prefix]},
    }


def install_operator(cluster: LocalCluster, namespace: str, values: Mapping[str, Any], workdir: Path) -> str:
    """``helm install`` the chart into ``namespace`` and wait for the operator pod; returns helm's output."""
    workdir.mkdir(parents=True, exist_ok=True)
    values_file = workdir / "values.yaml"
    values_file.write_text(yaml.safe_dump(dict(values)))
    return helm("install", RELEASE, str(CHART), "--namespace", namespace, "-f", str(values_file),
                "--wait", "--timeout", "240s", kubeconfig=cluster.kubeconfig).stdout


def uninstall_operator(cluster: LocalCluster, namespace: str) -> None:
    helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "120s",
         kubeconfig=cluster.kubeconfig, check=False)


def operator_pod(cluster: LocalCluster, namespace: str) -> dict[str, Any] | None:
    pods = cluster.get(f"/api/v1/namespaces/{namespace}/pods",
                       labelSelector="app.kubernetes.io/component=operator")["items"]
    return pods[0] if len(pods) == 1 else None


def pod_ready(pod: Mapping[str, Any] | None) -> bool:
    conds = {c["type"]: c["status"] for c in (pod or {}).get("status", {}).get("conditions") or []}
    return conds.get("Ready") == "True"


# --------------------------------------------------------------------------- model server


def model_server_objects(namespace: str, name: str, image: str, latency_ms: float = 0) -> list[dict[str, Any]]:
    """A kiosk-model-server Deployment (0 replicas: the pool scales it; opted in with the
    model-server label) and its ClusterIP Service, both meeting ``restricted``."""
    labels = {"app.kubernetes.io/name": "kiosk-model-server", "app.kubernetes.io/instance": name}
    command = ["kiosk-model-server", "--host", "0.0.0.0", "--port", str(MODEL_SERVER_PORT),
               "--models", "segmentation,null", "--latency-ms", f"{latency_ms:g}"]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {**labels, MODEL_SERVER_LABEL: "true"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "automountServiceAccountToken": False,
                "nodeSelector": dict(NODE_SELECTOR), "tolerations": [dict(TOLERATION)],
                "terminationGracePeriodSeconds": 5,
                "securityContext": RESTRICTED_POD_SC,
                "containers": [{
                    "name": "model-server", "image": image, "imagePullPolicy": "Never", "command": command,
                    "ports": [{"name": "grpc", "containerPort": MODEL_SERVER_PORT}],
                    "readinessProbe": {"tcpSocket": {"port": MODEL_SERVER_PORT}, "periodSeconds": 1},
                    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
                    "securityContext": RESTRICTED_CONTAINER_SC,
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
            }},
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "grpc", "port": MODEL_SERVER_PORT,
                                                 "targetPort": MODEL_SERVER_PORT}]},
    }
    return [deployment, service]


def create_model_server(cluster: LocalCluster, namespace: str, name: str, image: str,
                        latency_ms: float = 0) -> str:
    """Create the model server's Deployment and Service; returns the Service's cluster IP."""
    deployment, service = model_server_objects(namespace, name, image, latency_ms)
    cluster.request("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments", deployment)
    svc = cluster.request("POST", f"/api/v1/namespaces/{namespace}/services", service)
    return str(svc["spec"]["clusterIP"])


# --------------------------------------------------------------------------- pools


def real_pool(name: str, queue: str, *, image: str, redis: HostRedis, gcs: HostGcs, bucket: str,
              model_host: str, model_deployment: str | None, worker: Mapping[str, Any] | None = None,
              scaling: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ConsumerPool whose workers run on the real node and reach Redis, the bucket and the model
    server from there; ``worker``/``scaling`` entries override the defaults."""
    env = [{"name": k, "value": v} for k, v in storage_env(gcs).items()]
    env += [{"name": "MAX_RETRY", "value": "10"}, {"name": "GRPC_BACKOFF", "value": "0.5"},
            {"name": "EMPTY_QUEUE_TIMEOUT", "value": "2"}]
    worker_spec: dict[str, Any] = {
        "image": image, "imagePullPolicy": "Never",
        "nodeSelector": dict(NODE_SELECTOR), "tolerations": [dict(TOLERATION)],
        "graceSeconds": 25, "terminationGracePeriodSeconds": 40, "heartbeatIntervalSeconds": 1,
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "768Mi"}},
        "env": env,
    }
    worker_spec.update(worker or {})
    model: dict[str, Any] = {"host": model_host, "port": MODEL_SERVER_PORT}
    if model_deployment:
        model["deployment"] = {"name": model_deployment, "replicas": 1}
    return {
        "apiVersion": "kiosk.deepcell.org/v1alpha1", "kind": "ConsumerPool",
        "metadata": {"name": name},
        "spec": {
            "queues": [queue], "consumerType": "segmentation",
            "worker": worker_spec,
            "redis": {"host": HOST_IP, "port": redis.port},
            "modelServer": model,
            "storage": {"bucket": f"gs://{bucket}", "endpoint": gcs.endpoint},
            "scaling": {"minWorkers": 0, "maxWorkers": 2, "itemsPerWorker": 4,
                        "pollingIntervalSeconds": 1, "cooldownSeconds": 5, **(scaling or {})},
        },
    }


# --------------------------------------------------------------------------- the CLI


def kiosk_env(redis: HostRedis, gcs: HostGcs, bucket: str) -> dict[str, str]:
    """A user's environment for ``kiosk``: Redis and the bucket as the pods see them, no kubeconfig."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "STORAGE_", "KUBECONFIG"))}
    env.update(REDIS_HOST=HOST_IP, REDIS_PORT=str(redis.port), STORAGE_BUCKET=f"gs://{bucket}",
               COLUMNS="300", KUBECONFIG="/nonexistent/kubeconfig", **storage_env(gcs))
    return env


def kiosk_submit(paths: Iterable[Path], queue: str, out: Path, env: Mapping[str, str], *,
                 timeout: float = 300, extra: Iterable[str] = ()) -> subprocess.Popen[str]:
    """Start ``kiosk submit --wait`` (the user's command); the caller waits on the process."""
    argv = [str(KIOSK_BIN), "submit", *map(str, paths), "--queue", queue, "--model", "segmentation:1",
            "--wait", "--out", str(out), "--interval", "0.5", "--timeout", str(int(timeout)), *extra]
    return subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------- logs and diagnostics


class PodLogs:
    """Follow the logs of every container instance of the pods matching ``selector``, from the
    API server (``pods/log?follow=true``), until stopped. A container that restarts gets a new
    entry; logs survive the pod's deletion."""

    def __init__(self, cluster: LocalCluster, namespace: str, selector: str, container: str) -> None:
        self.c, self.ns, self.selector, self.container = cluster, namespace, selector, container
        self.logs: dict[tuple[str, int], list[str]] = {}
        #: pod name -> the node it ran on.
        self.nodes: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._followed: set[tuple[str, int]] = set()
        self._poller = threading.Thread(target=self._poll, daemon=True, name=f"podlogs-{selector}")

    def start(self) -> PodLogs:
        self._poller.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        self._poller.join(timeout)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def texts(self) -> dict[str, str]:
        """``pod#instance`` -> log text."""
        with self._lock:
            return {f"{pod}#{i}": "".join(lines) for (pod, i), lines in sorted(self.logs.items())}

    def all_text(self) -> str:
        return "\n".join(f"--- {k}\n{v}" for k, v in self.texts().items())

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.c.get(f"/api/v1/namespaces/{self.ns}/pods", labelSelector=self.selector)["items"]
            except (ApiError, OSError):
                pods = []
            for pod in pods:
                if pod["spec"].get("nodeName"):
                    self.nodes[pod["metadata"]["name"]] = pod["spec"]["nodeName"]
                for st in pod.get("status", {}).get("containerStatuses") or []:
                    if st["name"] != self.container:
                        continue
                    state = st.get("state", {})
                    if not (state.get("running") or state.get("terminated")):
                        continue
                    key = (pod["metadata"]["name"], int(st.get("restartCount", 0)))
                    if key not in self._followed:
                        self._followed.add(key)
                        t = threading.Thread(target=self._follow, args=key, daemon=True)
                        self._threads.append(t)
                        t.start()
            self._stop.wait(0.3)

    def _follow(self, pod: str, instance: int) -> None:
        lines = self.logs.setdefault((pod, instance), [])
        try:
            with self.c.api_client() as api_client:
                core = k8s_client.CoreV1Api(api_client)
                resp = core.read_namespaced_pod_log(pod, self.ns, container=self.container, follow=True,
                                                    _preload_content=False, _request_timeout=600)
                for chunk in resp.stream(4096):
                    with self._lock:
                        lines.append(chunk.decode(errors="replace"))
                    if self._stop.is_set() and not chunk:
                        break
        except Exception as exc:  # noqa: BLE001 - a log stream that ends badly is noted, not fatal
            with self._lock:
                lines.append(f"\n[log stream ended: {exc!r}]\n")


def container_log(cluster: LocalCluster, namespace: str, pod: str, container: str, previous: bool = False) -> str:
    query = {"container": container, "tailLines": "80"}
    if previous:
        query["previous"] = "true"
    try:
        return str(cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", query=query) or "")
    except (ApiError, OSError) as exc:
        return f"(no log: {exc})"


def diagnostics(cluster: LocalCluster, namespace: str) -> str:
    """Pods (phase, node, containers' states), their logs (and the previous instance's), Events."""
    out = [f"=== namespace {namespace}"]
    try:
        pods = cluster.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
        for pod in pods:
            name, st = pod["metadata"]["name"], pod.get("status", {})
            out.append(f"--- pod {name} phase={st.get('phase')} node={pod['spec'].get('nodeName')} "
                       f"reason={st.get('reason')} message={st.get('message')}")
            for cs in st.get("containerStatuses") or []:
                out.append(f"    container {cs['name']} ready={cs.get('ready')} restarts={cs.get('restartCount')} "
                           f"state={json.dumps(cs.get('state'))} last={json.dumps(cs.get('lastState'))}")
                out.append(container_log(cluster, namespace, name, cs["name"]))
                if cs.get("restartCount"):
                    out.append(f"    (previous instance of {cs['name']})")
                    out.append(container_log(cluster, namespace, name, cs["name"], previous=True))
        events = cluster.get(f"/api/v1/namespaces/{namespace}/events")["items"]
        events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        out.append("--- events")
        for e in events[-80:]:
            obj = e.get("involvedObject", {})
            out.append(f"{e.get('lastTimestamp') or e.get('eventTime')} {e.get('type')} {obj.get('kind')}/"
                       f"{obj.get('name')} {e.get('reason')}: {e.get('message')}")
        for kind in ("deployments", "replicasets"):
            for d in cluster.get(f"/apis/apps/v1/namespaces/{namespace}/{kind}")["items"]:
                out.append(f"{kind} {d['metadata']['name']} spec.replicas={d['spec'].get('replicas')} "
                           f"status={json.dumps(d.get('status', {}))[:300]}")
        for p in cluster.get(f"/apis/kiosk.deepcell.org/v1alpha1/namespaces/{namespace}/consumerpools")["items"]:
            out.append(f"pool {p['metadata']['name']} status={json.dumps(p.get('status', {}))[:1500]}")
    except (ApiError, OSError) as exc:
        out.append(f"(diagnostics incomplete: {exc})")
    return "\n".join(out)


def wait_pods_gone(cluster: LocalCluster, namespace: str, selector: str = "", timeout: float = 90) -> None:
    query = {"labelSelector": selector} if selector else {}
    wait_for(lambda: not cluster.get(f"/api/v1/namespaces/{namespace}/pods", **query)["items"], timeout,
             f"pods {selector or 'all'} of {namespace} gone", ignore=(ApiError,))


# --------------------------------------------------------------------------- the module's world


@dataclass
class RealNodeE2E:
    """What the tests of one module share: the cluster with its real node, a ``restricted``
    namespace with the chart's operator in it, Redis and a bucket the pods reach on HOST_IP."""

    cluster: LocalCluster
    namespace: str
    worker: BuiltImage
    operator: BuiltImage
    redis: HostRedis
    gcs: HostGcs
    bucket: str
    workdir: Path
    timings: dict[str, float] = field(default_factory=dict)

    def pools_path(self) -> str:
        return f"/apis/kiosk.deepcell.org/v1alpha1/namespaces/{self.namespace}/consumerpools"

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create a pool, Deployment or Service in the namespace (as the admin)."""
        kind = obj["kind"]
        path = {"ConsumerPool": self.pools_path(),
                "Deployment": f"/apis/apps/v1/namespaces/{self.namespace}/deployments",
                "Service": f"/api/v1/namespaces/{self.namespace}/services"}[kind]
        return self.cluster.request("POST", path, dict(obj))

    def delete_pool(self, name: str, timeout: float = 90) -> None:
        """Delete a pool and wait until the operator released it (its finalizer) and its pods are gone."""
        try:
            self.cluster.request("DELETE", f"{self.pools_path()}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        wait_for(lambda: not self.cluster.exists(f"{self.pools_path()}/{name}"), timeout,
                 f"pool {name} deleted (operator finalizer)", ignore=(ApiError,))
        wait_pods_gone(self.cluster, self.namespace, f"kiosk.deepcell.org/pool={name}", timeout)

    def deployment(self, name: str) -> dict[str, Any]:
        return self.cluster.get(f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}")

    def replicas(self, name: str) -> int:
        return int(self.deployment(name)["spec"].get("replicas") or 0)

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return self.cluster.get(f"/api/v1/namespaces/{self.namespace}/pods", labelSelector=selector)["items"]

    def pool(self, name: str) -> dict[str, Any]:
        return self.cluster.get(f"{self.pools_path()}/{name}")

    def events(self, involved: str) -> list[dict[str, Any]]:
        items = self.cluster.get(f"/api/v1/namespaces/{self.namespace}/events")["items"]
        return [e for e in items if e.get("involvedObject", {}).get("name") == involved]


@pytest.fixture(scope="module")
def real_node_e2e(k8s_cluster: LocalCluster, _real_node_module: None, crd: Any,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNodeE2E]:
    """The real node, our images imported into it, Redis and GCS on HOST_IP, and the chart
    installed with ``helm`` into a fresh ``restricted`` namespace; all removed at the module's end."""
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    cluster = k8s_cluster
    try:
        cluster.start_real_node()
    except NodeUnsupported as exc:  # one line naming what this machine lacks; never a skip
        pytest.fail(str(exc), pytrace=False)
    timings["node"] = time.monotonic() - t0
    worker, operator = node_image(cluster, "worker"), node_image(cluster, "operator")
    timings["images"] = time.monotonic() - t0
    workdir = tmp_path_factory.mktemp("real-node-e2e")
    redis = HostRedis().start()
    gcs = HostGcs().start()
    namespace = cluster.create_namespace(f"e2e-real-{uuid.uuid4().hex[:6]}",
                                         labels={**RESTRICTED, "kiosk-operator.test/namespace": "true"})
    env = RealNodeE2E(cluster, namespace, worker, operator, redis, gcs, gcs.create_bucket(), workdir, timings)
    try:
        values = operator_values(operator, worker.ref.rsplit(":", 1)[0] + ":")
        install_operator(cluster, namespace, values, workdir / "helm")
        wait_for(lambda: pod_ready(operator_pod(cluster, namespace)), 120, "the operator pod Ready",
                 ignore=(ApiError,))
        timings["operator"] = time.monotonic() - t0
        yield env
    except BaseException:
        print(diagnostics(cluster, namespace))
        raise
    finally:
        try:
            for pool in cluster.get(env.pools_path())["items"]:
                env.delete_pool(pool["metadata"]["name"])
        except (ApiError, OSError, AssertionError) as exc:
            print(f"pool cleanup: {exc}")
        uninstall_operator(cluster, namespace)
        cluster.delete_namespace(namespace)
        try:  # pods on the real node must be gone before the node stops
            wait_pods_gone(cluster, namespace, timeout=120)
        except AssertionError as exc:
            print(f"namespace cleanup: {exc}\n{diagnostics(cluster, namespace)}")
        gcs.cleanup()
        redis.cleanup()


__all__ = [
    "CHART", "HOST_IP", "KIOSK_BIN", "MODEL_SERVER_LABEL", "MODEL_SERVER_PORT", "RELEASE",
    "RESTRICTED", "HostGcs", "HostRedis", "PodLogs", "RealNodeE2E", "container_log", "create_model_server", "ctr",
    "diagnostics", "helm", "install_operator", "kiosk_env", "kiosk_submit", "model_server_objects", "node_image",
    "operator_pod", "operator_values", "pod_ready", "real_node_e2e", "real_pool", "sigkill_container", "storage_env",
    "uninstall_operator", "wait_pods_gone",
]
