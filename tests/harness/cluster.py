"""A real local Kubernetes control plane for tests (no mocks).

Processes, all on 127.0.0.1 with free ports, binaries built from Go modules by
tools/cluster/build.sh into ``${KIOSK_CACHE:-~/.cache/kiosk-operator}/bin``:

    etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler, kwok

kwok plays kubelet for fake nodes (annotation ``kwok.x-k8s.io/node=fake``):
pods become Running/Ready, pods owned by a Job become Succeeded after
``job_pod_duration`` seconds (per pod override: annotation
``pod-complete.stage.kwok.x-k8s.io/delay: "5s"``; annotation
``kiosk-operator.test/pod-fail: "true"`` makes a Job pod fail with exit code 1;
pods labelled ``kiosk.deepcell.org/kubelet`` are never completed by kwok: the
harness's KubeletPlayer runs them as local processes and reports their outcome),
and deleted pods are removed (finalizers are left to their owners, as with a real
kubelet). The controller-manager runs all controllers, so Deployments get
ReplicaSets and pods, Jobs complete, and deleting an owner garbage-collects its
children.

Use from Python::

    with LocalCluster(nodes=3) as c:
        c.kubectl("get", "nodes")
        os.environ["KUBECONFIG"] = str(c.kubeconfig)

or the CLI (detached cluster, state in ``${KIOSK_CACHE}/cluster-state.json``)::

    python -m harness.cluster up      # run from tests/ (or tools/cluster/cluster.py up)
    python -m harness.cluster down
"""

from __future__ import annotations

import argparse
import atexit
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .wait import WaitTimeout, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "cluster" / "build.sh"

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
CLUSTER_BINARIES = ("etcd",) + K8S_BINARIES + ("kwok",)
ALL_BINARIES = CLUSTER_BINARIES + ("helm",)

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
POD_FAIL_ANNOTATION = "kiosk-operator.test/pod-fail"
POD_COMPLETE_DELAY_ANNOTATION = "pod-complete.stage.kwok.x-k8s.io/delay"
# Pods with this label are "run" by tests/harness/kubelet.py (KubeletPlayer), which reports
# their outcome itself; kwok still makes them Running but never completes or fails them.
HARNESS_KUBELET_LABEL = "kiosk.deepcell.org/kubelet"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"


class ClusterError(RuntimeError):
    """Something about the local cluster went wrong."""


class ClusterStartError(ClusterError):
    """A control-plane process failed to start; the message has its log tail."""


class ApiError(ClusterError):
    def __init__(self, method: str, path: str, status: int, body: str):
        self.method, self.path, self.status, self.body = method, path, status, body
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")


# --------------------------------------------------------------------------- binaries


def cache_dir() -> Path:
    return Path(os.environ.get("KIOSK_CACHE") or Path.home() / ".cache" / "kiosk-operator")


def state_file() -> Path:
    return cache_dir() / "cluster-state.json"


@lru_cache(maxsize=1)
def binary_versions() -> dict[str, str]:
    """name -> version, as pinned in tools/cluster/build.sh (single source of truth)."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-versions"], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def binary_path(name: str) -> Path:
    """Path of a cached binary (may not exist yet; see ensure_binaries)."""
    versions = binary_versions()
    if name not in versions:
        raise KeyError(f"unknown binary {name!r}; known: {sorted(versions)}")
    return cache_dir() / "bin" / f"{name}-{versions[name]}"


def ensure_binaries(names: Iterable[str] = ALL_BINARIES) -> dict[str, Path]:
    """Build any missing binaries (runs tools/cluster/build.sh; cold: tens of minutes)."""
    names = list(names)
    missing = [n for n in names if not os.access(binary_path(n), os.X_OK)]
    if missing:
        print(f"[cluster] building missing binaries: {' '.join(missing)}", file=sys.stderr, flush=True)
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), *missing])
        if proc.returncode != 0:
            raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
        still = [n for n in missing if not os.access(binary_path(n), os.X_OK)]
        if still:
            raise ClusterError(f"build finished but binaries are still missing: {still}")
    return {n: binary_path(n) for n in names}


# --------------------------------------------------------------------------- helpers


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(data.splitlines()[-lines:])


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _pid_alive(pid: int, exe: str | None = None) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie
        return False
    return exe is None or cmdline.split(b"\0", 1)[0].decode(errors="replace") == exe


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterStartError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def _b64file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# --------------------------------------------------------------------------- kwok stages

# A custom Stage set replaces ALL kwok defaults, so node stages are included.
# Modelled on kwok's kustomize/stage/{node/fast,node/heartbeat-with-lease,pod/fast}.
# Node liveness is kept by kwok's node leases (on by default, 40s); the status
# heartbeat is slow. kwok options are passed as flags: a KwokConfiguration document
# in this file would bypass kwok's defaulting (e.g. node lease parallelism 0).
_KWOK_CONFIG = r"""
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-initialize
spec:
  resourceRef:
    apiGroup: v1
    kind: Node
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $lastTransitionTime | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type | Quote }}
      {{ end }}
      addresses:
      {{ with .status.addresses }}
      {{ YAML . 1 }}
      {{ else }}
      {{ with NodeIP }}
      - address: {{ . | Quote }}
        type: InternalIP
      {{ end }}
      {{ with NodeName }}
      - address: {{ . | Quote }}
        type: Hostname
      {{ end }}
      {{ end }}
      {{ with NodePort }}
      daemonEndpoints:
        kubeletEndpoint:
          Port: {{ . }}
      {{ end }}
      allocatable:
      {{ with .status.allocatable }}
      {{ YAML . 1 }}
      {{ else }}
        cpu: "32"
        memory: 128Gi
        pods: "110"
      {{ end }}
      capacity:
      {{ with .status.capacity }}
      {{ YAML . 1 }}
      {{ else }}
        cpu: "32"
        memory: 128Gi
        pods: "110"
      {{ end }}
      {{ $nodeInfo := .status.nodeInfo }}
      {{ $kwokVersion := printf "kwok-%s" Version }}
      nodeInfo:
        architecture: {{ or $nodeInfo.architecture "amd64" }}
        bootID: {{ or $nodeInfo.bootID `""` }}
        containerRuntimeVersion: {{ or $nodeInfo.containerRuntimeVersion $kwokVersion }}
        kernelVersion: {{ or $nodeInfo.kernelVersion $kwokVersion }}
        kubeProxyVersion: {{ or $nodeInfo.kubeProxyVersion $kwokVersion }}
        kubeletVersion: {{ or $nodeInfo.kubeletVersion $kwokVersion }}
        machineID: {{ or $nodeInfo.machineID `""` }}
        operatingSystem: {{ or $nodeInfo.operatingSystem "linux" }}
        osImage: {{ or $nodeInfo.osImage `""` }}
        systemUUID: {{ or $nodeInfo.systemUUID `""` }}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-heartbeat-with-lease
spec:
  resourceRef:
    apiGroup: v1
    kind: Node
  selector:
    matchExpressions:
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'In'
      values: ['True']
  delay:
    durationMilliseconds: 600000
    jitterDurationMilliseconds: 610000
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $lastTransitionTime | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type | Quote }}
      {{ end }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Pending']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: PodScheduled
      {{ range .spec.readinessGates }}
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: {{ .conditionType | Quote }}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        started: true
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      initContainerStatuses:
      {{ range .spec.initContainers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        {{ if eq .restartPolicy "Always" }}
        started: true
        state:
          running:
            startedAt: {{ $now | Quote }}
        {{ else }}
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
        {{ end }}
      {{ end }}
      {{ $hostIPs := NodeIPsWith .spec.nodeName }}
      {{ with $hostIPs }}
      hostIP: {{ index . 0 | Quote }}
      hostIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
      {{ $podIPs := PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
      {{ with $podIPs }}
      podIP: {{ index . 0 | Quote }}
      podIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-complete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.metadata.ownerReferences.[].kind'
      operator: 'In'
      values: ['Job']
    - key: '.metadata.annotations["@POD_FAIL_ANNOTATION@"]'
      operator: 'DoesNotExist'
    - key: '.metadata.labels["@HARNESS_KUBELET_LABEL@"]'
      operator: 'DoesNotExist'
  delay:
    durationMilliseconds: @JOB_POD_MS@
    durationFrom:
      expressionFrom: '.metadata.annotations["@POD_COMPLETE_DELAY_ANNOTATION@"]'
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $root := . }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        type: Ready
        reason: PodCompleted
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        type: ContainersReady
        reason: PodCompleted
      containerStatuses:
      {{ range $index, $item := .spec.containers }}
      - image: {{ $item.image | Quote }}
        name: {{ $item.name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
      {{ end }}
      phase: Succeeded
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-fail
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.metadata.ownerReferences.[].kind'
      operator: 'In'
      values: ['Job']
    - key: '.metadata.annotations["@POD_FAIL_ANNOTATION@"]'
      operator: 'In'
      values: ['true']
    - key: '.metadata.labels["@HARNESS_KUBELET_LABEL@"]'
      operator: 'DoesNotExist'
  delay:
    durationMilliseconds: @JOB_POD_MS@
    durationFrom:
      expressionFrom: '.metadata.annotations["@POD_COMPLETE_DELAY_ANNOTATION@"]'
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        type: Ready
        reason: PodFailed
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        type: ContainersReady
        reason: PodFailed
      containerStatuses:
      {{ range $index, $item := .spec.containers }}
      - image: {{ $item.image | Quote }}
        name: {{ $item.name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 1
            finishedAt: {{ $now | Quote }}
            reason: Error
            startedAt: {{ $now | Quote }}
      {{ end }}
      phase: Failed
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  delay:
    durationMilliseconds: @POD_DELETE_MS@
  next:
    delete: true
"""


def kwok_config(job_pod_duration: float, pod_delete_delay: float = 0.0) -> str:
    text = _KWOK_CONFIG
    for key, value in {
        "@JOB_POD_MS@": str(int(job_pod_duration * 1000)),
        "@POD_DELETE_MS@": str(int(pod_delete_delay * 1000)),
        "@POD_FAIL_ANNOTATION@": POD_FAIL_ANNOTATION,
        "@POD_COMPLETE_DELAY_ANNOTATION@": POD_COMPLETE_DELAY_ANNOTATION,
        "@HARNESS_KUBELET_LABEL@": HARNESS_KUBELET_LABEL,
    }.items():
        text = text.replace(key, value)
    return text.lstrip()


# --------------------------------------------------------------------------- cluster


class _Proc:
    def __init__(self, name: str, argv: list[str], log: Path, popen: subprocess.Popen | None, pid: int):
        self.name, self.argv, self.log, self.popen, self.pid = name, argv, log, popen, pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_alive(self.pid, self.argv[0])

    def exit_desc(self) -> str:
        if self.popen is not None and self.popen.poll() is not None:
            return f"exited with code {self.popen.returncode}"
        return "not running"


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on 127.0.0.1.

    Attributes after start(): ``kubeconfig`` (admin, group system:masters), ``server``,
    ``workdir`` (logs: ``<workdir>/logs/<process>.log``), ``ca_file``.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        job_pod_duration: float = 1.0,
        pod_delete_delay: float = 0.0,
        node_cpu: str = "32",
        node_memory: str = "128Gi",
        node_pods: str = "110",
        node_gpus: int = 4,
        workdir: os.PathLike | None = None,
        keep_workdir: bool = False,
        detached: bool = False,
        start_timeout: float = 120.0,
        extra_apiserver_args: Sequence[str] = (),
    ):
        self.initial_nodes = nodes
        self.job_pod_duration = job_pod_duration
        self.pod_delete_delay = pod_delete_delay
        self.node_defaults = dict(cpu=node_cpu, memory=node_memory, pods=node_pods, gpus=node_gpus)
        self._workdir_arg = Path(workdir) if workdir else None
        self.keep_workdir = keep_workdir or bool(os.environ.get("KIOSK_KEEP_CLUSTER_DIR"))
        self.detached = detached
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.workdir: Path | None = None
        self.kubeconfig: Path | None = None
        self.server: str | None = None
        self.ports: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.procs: list[_Proc] = []
        self._owned = True
        self._node_seq = 0
        self._ssl: ssl.SSLContext | None = None
        self._atexit_registered = False

    # ----------------------------------------------------------------- paths

    @property
    def pki(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def log_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "logs"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        bins = ensure_binaries(CLUSTER_BINARIES)
        t0 = time.monotonic()
        if self._workdir_arg:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = self._workdir_arg
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="kiosk-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.detached and not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            for attempt in range(3):
                try:
                    self._start_processes(bins, t0)
                    break
                except ClusterStartError as exc:
                    # Free ports are picked then released; another process may grab one.
                    if "address already in use" not in str(exc) or attempt == 2:
                        raise
                    self._stop_processes()
        except BaseException:
            self._stop_processes()
            self.keep_workdir = True  # keep logs for the post-mortem
            raise
        self.timings["total"] = time.monotonic() - t0
        return self

    def _start_processes(self, bins: Mapping[str, Path], t0: float) -> None:
        assert self.workdir is not None
        wd = self.workdir
        etcd_port, etcd_peer, api_port, kcm_port, sched_port = _free_ports(5)
        self.ports = dict(etcd=etcd_port, etcd_peer=etcd_peer, apiserver=api_port,
                          controller_manager=kcm_port, scheduler=sched_port)
        self.server = f"https://127.0.0.1:{api_port}"
        self._write_pki()
        self.kubeconfig = wd / "kubeconfig"
        self._write_kubeconfig(self.kubeconfig, user={
            "client-certificate-data": _b64file(self.pki / "admin.crt"),
            "client-key-data": _b64file(self.pki / "admin.key"),
        }, embed_ca=True)
        for comp, cert in (("controller-manager", "kcm"), ("scheduler", "scheduler"), ("kwok", "kwok")):
            self._write_kubeconfig(wd / f"{comp}.kubeconfig", user={
                "client-certificate": str(self.pki / f"{cert}.crt"),
                "client-key": str(self.pki / f"{cert}.key"),
            })
        (wd / "kwok.yaml").write_text(kwok_config(self.job_pod_duration, self.pod_delete_delay))
        self.timings["pki"] = time.monotonic() - t0

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        etcd = self._spawn("etcd", [
            str(bins["etcd"]), "--name=kiosk", f"--data-dir={wd / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kiosk={peer_url}", "--initial-cluster-state=new",
            "--unsafe-no-fsync=true", "--log-level=warn", "--quota-backend-bytes=4294967296",
        ])
        self._wait_http(etcd, f"{etcd_url}/health", lambda b: '"health":"true"' in b.replace(" ", ""))
        self.timings["etcd"] = time.monotonic() - t0

        pki = self.pki
        api = self._spawn("kube-apiserver", [
            str(bins["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC,Node",
            "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",  # 127.0.0.1 is not a valid Endpoints address
            "--profiling=false",
            *self.extra_apiserver_args,
        ])
        self._wait_http(api, f"{self.server}/readyz", lambda b: b.strip() == "ok")
        self.timings["apiserver"] = time.monotonic() - t0

        kcm = self._spawn("kube-controller-manager", [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={wd / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            "--controllers=*",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--profiling=false",
            "--kube-api-qps=200", "--kube-api-burst=400",  # default 20/30 throttles startup
        ])
        sched = self._spawn("kube-scheduler", [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={wd / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
            "--leader-elect=false",
            "--profiling=false",
            "--kube-api-qps=200", "--kube-api-burst=400",
        ])
        kwok = self._spawn("kwok", [
            str(bins["kwok"]),
            f"--kubeconfig={wd / 'kwok.kubeconfig'}",
            f"--config={wd / 'kwok.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=10.240.0.1",
        ], env={"HOME": str(wd)})  # so kwok does not also load ~/.kwok/kwok.yaml

        if self.initial_nodes:
            self.create_nodes(self.initial_nodes, wait=False)
        self._wait_http(kcm, f"https://127.0.0.1:{kcm_port}/healthz", lambda b: b.strip() == "ok")
        self._wait_http(sched, f"https://127.0.0.1:{sched_port}/healthz", lambda b: b.strip() == "ok")
        self.timings["controllers"] = time.monotonic() - t0
        self._wait_with_procs(lambda: self._sa_exists("default", "default"),
                              "ServiceAccount default/default (controller-manager)")
        if self.initial_nodes:
            self.wait_nodes_ready(procs=[kwok])
        self.timings["nodes"] = time.monotonic() - t0

    def stop(self) -> None:
        """Stop all processes (kwok first, etcd last) and remove the workdir unless kept."""
        if not self._owned:
            return
        self._stop_processes()
        if self.workdir and not self.keep_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_processes(self) -> None:
        # One at a time, clients first: kube-apiserver stops slowly (~10s) if etcd
        # goes away under it, and quickly (~1s) otherwise.
        for p in reversed(self.procs):
            if p.alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                wait_for(lambda p=p: not p.alive(), 10, f"{p.name} to exit", interval=0.02, max_interval=0.1)
            except WaitTimeout:
                pass
            if p.alive():
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if p.popen is not None:
                try:
                    p.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.procs = []

    # ----------------------------------------------------------------- processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Proc:
        log = self.log_path(name)
        full_env = dict(os.environ)
        full_env.pop("KUBECONFIG", None)
        full_env.update(env or {})
        with open(log, "ab") as logf:
            logf.write(f"# {' '.join(argv)}\n".encode())
            logf.flush()
            popen = subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(self.workdir), env=full_env, start_new_session=True,
                preexec_fn=None if self.detached else _set_pdeathsig,
            )
        proc = _Proc(name, argv, log, popen, popen.pid)
        self.procs.append(proc)
        return proc

    def _fail(self, proc: _Proc, reason: str) -> ClusterStartError:
        return ClusterStartError(
            f"{proc.name} {reason} (workdir {self.workdir}); last lines of {proc.log}:\n{_log_tail(proc.log)}"
        )

    def _wait_http(self, proc: _Proc, url: str, ok, timeout: float | None = None) -> None:
        ctx = self._ssl_context() if url.startswith(f"https://127.0.0.1:{self.ports['apiserver']}") else None
        if url.startswith("https") and ctx is None:
            ctx = ssl._create_unverified_context()  # components' self-signed serving certs
        last = ""

        def ready() -> bool:
            nonlocal last
            if not proc.alive():
                raise self._fail(proc, f"{proc.exit_desc()} before {url} was ready")
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                    body = resp.read().decode(errors="replace")
                    if ok(body):
                        return True
                    last = f"HTTP {resp.status}: {body[:200]}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
            except (OSError, ValueError) as exc:
                last = repr(exc)
            return False

        try:
            wait_for(ready, timeout or self.start_timeout, f"{url} ready", interval=0.1, max_interval=0.1)
        except WaitTimeout:
            raise self._fail(
                proc, f"not ready at {url} after {timeout or self.start_timeout:.0f}s (last: {last})") from None

    def _wait_with_procs(self, predicate, message: str, timeout: float | None = None,
                         procs: list[_Proc] | None = None) -> Any:
        procs = self.procs if procs is None else procs

        def check():
            for p in self.procs:
                if not p.alive():
                    raise self._fail(p, f"{p.exit_desc()} while waiting for {message}")
            return predicate()

        try:
            return wait_for(check, timeout or self.start_timeout, message, ignore=(ApiError, OSError))
        except WaitTimeout as exc:
            tails = "\n".join(f"--- {p.name} ({p.log}):\n{_log_tail(p.log, 15)}" for p in procs)
            raise ClusterStartError(f"{exc}\n{tails}") from None

    # ----------------------------------------------------------------- pki / kubeconfig

    def _write_pki(self) -> None:
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)
        if (pki / "admin.crt").exists():
            return
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl("req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
                 "-subj", "/CN=kiosk-local-ca",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=pki)
        leaves = {
            "apiserver": ("/CN=kube-apiserver", "serverAuth",
                          "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                          "DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"),
            "admin": ("/O=system:masters/CN=kubernetes-admin", "clientAuth", None),
            "kcm": ("/CN=system:kube-controller-manager", "clientAuth", None),
            "scheduler": ("/CN=system:kube-scheduler", "clientAuth", None),
            "kwok": ("/O=system:masters/CN=kwok", "clientAuth", None),
        }
        for name, (subj, eku, san) in leaves.items():
            ext = ["basicConstraints=critical,CA:FALSE",
                   "keyUsage=critical,digitalSignature,keyEncipherment",
                   f"extendedKeyUsage={eku}"]
            if san:
                ext.append(f"subjectAltName={san}")
            (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
            _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=pki)
            _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                     "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", f"{name}.ext", cwd=pki)
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "sa.key", cwd=pki)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        for f in pki.glob("*.key"):
            f.chmod(0o600)

    def _write_kubeconfig(self, path: Path, user: Mapping[str, Any], *, embed_ca: bool = False,
                          namespace: str | None = None, user_name: str = "admin") -> Path:
        cluster: dict[str, Any] = {"server": self.server}
        if embed_ca:
            cluster["certificate-authority-data"] = _b64file(self.ca_file)
        else:
            cluster["certificate-authority"] = str(self.ca_file)
        context: dict[str, Any] = {"cluster": "kiosk-local", "user": user_name}
        if namespace:
            context["namespace"] = namespace
        cfg = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "kiosk-local", "cluster": cluster}],
            "users": [{"name": user_name, "user": dict(user)}],
            "contexts": [{"name": "kiosk-local", "context": context}],
            "current-context": "kiosk-local",
        }
        path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is valid kubeconfig YAML
        path.chmod(0o600)
        return path

    def kubeconfig_for_serviceaccount(self, namespace: str, name: str, *, mode: str = "token",
                                      expiration_seconds: int = 86400, path: os.PathLike | None = None) -> Path:
        """Write a kubeconfig that acts as ServiceAccount ``namespace/name`` (exactly its RBAC).

        mode="token" (default): a bound token from the TokenRequest API; works with every
        client, including the Python ``kubernetes`` package. The ServiceAccount must exist.
        mode="impersonate": admin client cert + ``as: system:serviceaccount:ns:name``.
        Only kubectl/client-go honour ``as``; the Python ``kubernetes`` client silently
        ignores it (it would run as cluster-admin), so do not use it for the operator.
        """
        assert self.workdir is not None
        user_name = f"system:serviceaccount:{namespace}:{name}"
        out = Path(path) if path else self.workdir / "kubeconfigs" / f"sa-{namespace}-{name}-{mode}.kubeconfig"
        out.parent.mkdir(parents=True, exist_ok=True)
        if mode == "token":
            resp = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", {
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            })
            user: dict[str, Any] = {"token": resp["status"]["token"]}
        elif mode == "impersonate":
            user = {
                "client-certificate-data": _b64file(self.pki / "admin.crt"),
                "client-key-data": _b64file(self.pki / "admin.key"),
                "as": user_name,
            }
        else:
            raise ValueError(f"mode must be 'token' or 'impersonate', not {mode!r}")
        return self._write_kubeconfig(out, user, embed_ca=True, namespace=namespace, user_name=user_name)

    # ----------------------------------------------------------------- API access

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._ssl = ctx
        return self._ssl

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30,
                content_type: str = "application/json", query: Mapping[str, str] | None = None) -> Any:
        """Admin request to the API server; returns parsed JSON (None for empty bodies).

        Raises ApiError on HTTP errors (``.status`` is e.g. 404 or 409).
        """
        url = f"{self.server}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(method, path, exc.code, exc.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def exists(self, path: str) -> bool:
        try:
            self.request("GET", path)
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120,
                kubeconfig: os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run the built kubectl against this cluster (admin unless ``kubeconfig`` given)."""
        argv = [str(binary_path("kubectl")), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def kubectl_json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", **kw).stdout)

    def apply(self, manifest: str, namespace: str | None = None) -> subprocess.CompletedProcess:
        """kubectl apply -f - (YAML or JSON text)."""
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=manifest)

    def api_client(self):
        """A ``kubernetes.client.ApiClient`` (admin) if the Python package is installed."""
        from kubernetes import config  # type: ignore

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # ----------------------------------------------------------------- nodes

    def create_nodes(self, count: int, *, prefix: str = "kwok-node-", cpu: str | None = None,
                     memory: str | None = None, pods: str | None = None, gpus: int | None = None,
                     labels: Mapping[str, str] | None = None, taints: Sequence[Mapping[str, str]] = (),
                     wait: bool = True) -> list[str]:
        """Create ``count`` fake nodes managed by kwok; returns their names."""
        d = self.node_defaults
        resources = {"cpu": cpu or d["cpu"], "memory": memory or d["memory"], "pods": pods or d["pods"]}
        g = d["gpus"] if gpus is None else gpus
        if g:
            resources["nvidia.com/gpu"] = str(g)
        names = []
        for _ in range(count):
            name = f"{prefix}{self._node_seq}"
            self._node_seq += 1
            node_labels = {
                "type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "node-role.kubernetes.io/agent": "",
                **(labels or {}),
            }
            self.request("POST", "/api/v1/nodes", {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": node_labels,
                             "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {"taints": [dict(t) for t in taints]} if taints else {},
                "status": {"allocatable": resources, "capacity": resources, "phase": "Pending"},
            })
            names.append(name)
        if wait:
            self.wait_nodes_ready(names)
        return names

    def _nodes_ready(self, names: Sequence[str] | None) -> bool:
        items = self.get("/api/v1/nodes")["items"]
        by_name = {n["metadata"]["name"]: n for n in items}
        wanted = names if names is not None else [
            n for n, o in by_name.items()
            if o["metadata"].get("annotations", {}).get(KWOK_NODE_ANNOTATION) == "fake"]
        for name in wanted:
            node = by_name.get(name)
            if node is None:
                return False
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            if conds.get("Ready") != "True":
                return False
            if any(t["key"] in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
                   for t in node.get("spec", {}).get("taints", []) or []):
                return False
        return True

    def wait_nodes_ready(self, names: Sequence[str] | None = None, timeout: float | None = None,
                         procs: list[_Proc] | None = None) -> None:
        """Wait until the nodes (default: all kwok nodes) are Ready and untainted by the node controller."""
        self._wait_with_procs(lambda: self._nodes_ready(names), f"nodes {names or 'all'} Ready",
                              timeout=timeout, procs=procs)

    def _sa_exists(self, namespace: str, name: str) -> bool:
        return self.exists(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")

    # ----------------------------------------------------------------- namespaces

    def create_namespace(self, name: str, *, labels: Mapping[str, str] | None = None,
                         wait_default_sa: bool = True, timeout: float = 30) -> str:
        self.request("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}})
        if wait_default_sa:  # pods cannot be created before the controller-manager makes it
            wait_for(lambda: self._sa_exists(name, "default"), timeout,
                     f"ServiceAccount {name}/default", ignore=(ApiError,))
        return name

    def delete_namespace(self, name: str, *, wait: bool = False, timeout: float = 60) -> None:
        try:
            self.request("DELETE", f"/api/v1/namespaces/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        if wait:
            wait_for(lambda: not self.exists(f"/api/v1/namespaces/{name}"), timeout,
                     f"namespace {name} deleted")

    # ----------------------------------------------------------------- state (CLI)

    def state(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "kubeconfig": str(self.kubeconfig), "server": self.server,
            "ports": self.ports, "node_seq": self._node_seq,
            "pids": {p.name: p.pid for p in self.procs},
            "exes": {p.name: p.argv[0] for p in self.procs},
            "logs": {p.name: str(p.log) for p in self.procs},
            "started": time.time(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None = None) -> LocalCluster:
        """Attach to a running detached cluster (``make cluster-up``); stop() is a no-op."""
        if state is None:
            state = json.loads(state_file().read_text())
        c = cls(nodes=0)
        c._owned = False
        c.workdir = Path(state["workdir"])
        c.kubeconfig = Path(state["kubeconfig"])
        c.server = state["server"]
        c.ports = dict(state["ports"])
        c._node_seq = int(state.get("node_seq", 0))
        c.procs = [_Proc(n, [state["exes"][n]], Path(state["logs"][n]), None, pid)
                   for n, pid in state["pids"].items()]
        return c

    def alive(self) -> bool:
        return bool(self.procs) and all(p.alive() for p in self.procs)


# --------------------------------------------------------------------------- CLI


def _cmd_up(args: argparse.Namespace) -> int:
    sf = state_file()
    if sf.exists():
        try:
            existing = LocalCluster.from_state()
            if existing.alive():
                print(f"# cluster already running (state {sf})", file=sys.stderr)
                print(f"export KUBECONFIG={existing.kubeconfig}")
                return 0
        except (OSError, ValueError, KeyError):
            pass
        _cmd_down(args, quiet=True)
    workdir = cache_dir() / "cluster"
    if workdir.exists():
        shutil.rmtree(workdir)
    c = LocalCluster(nodes=args.nodes, job_pod_duration=args.job_pod_duration, workdir=workdir,
                     keep_workdir=True, detached=True)
    t0 = time.monotonic()
    c.start()
    sf.parent.mkdir(parents=True, exist_ok=True)
    sf.write_text(json.dumps(c.state(), indent=2) + "\n")
    print(f"# cluster up in {time.monotonic() - t0:.1f}s: {c.server}, {args.nodes} kwok nodes, "
          f"logs in {c.log_dir}, state {sf}", file=sys.stderr)
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0


def _cmd_down(args: argparse.Namespace, quiet: bool = False) -> int:
    sf = state_file()
    if not sf.exists():
        if not quiet:
            print("# no cluster state; nothing to stop", file=sys.stderr)
        return 0
    state = json.loads(sf.read_text())
    c = LocalCluster.from_state(state)
    c._owned = True
    c._stop_processes()
    shutil.rmtree(state["workdir"], ignore_errors=True)
    sf.unlink()
    if not quiet:
        print("# cluster stopped", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    sf = state_file()
    if not sf.exists():
        print("down")
        return 1
    c = LocalCluster.from_state()
    for p in c.procs:
        print(f"{p.name:<25} pid {p.pid:<8} {'running' if p.alive() else 'DEAD'}  log {p.log}")
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0 if c.alive() else 1


def _cmd_build(args: argparse.Namespace) -> int:
    ensure_binaries(args.names or ALL_BINARIES)
    for n in args.names or ALL_BINARIES:
        print(binary_path(n))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.cluster", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a detached cluster; prints export KUBECONFIG=...")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--job-pod-duration", type=float, default=1.0, help="seconds before Job pods succeed")
    sub.add_parser("down", help="stop the detached cluster")
    sub.add_parser("status", help="show the detached cluster's processes")
    b = sub.add_parser("build", help="build missing binaries and print their paths")
    b.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "build": _cmd_build}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
