"""LocalCluster: a real Kubernetes control plane on 127.0.0.1 for tests (no mocks).

Starts the processes of harness.cluster.control_plane with the certificates of
harness.cluster.pki and kwok (harness.cluster.kwok) as the fake nodes' kubelet; API calls
go through harness.cluster.api.KubeApi.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..wait import WaitTimeout, wait_for
from . import control_plane as cp
from . import kwok, pki
from .api import KubeApi
from .binaries import CLUSTER_BINARIES, binary_path, ensure_binaries, state_file
from .errors import ApiError, ClusterError, ClusterStartError
from .netns import HOST_IP
from .realnode import RealNode


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on 127.0.0.1.

    Attributes after start(): ``kubeconfig`` (admin, group system:masters), ``server``,
    ``workdir`` (logs: ``<workdir>/logs/<process>.log``), ``ca_file``, ``api`` (KubeApi).
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
        extra_controller_manager_args: Sequence[str] = (),
        real_node: bool = False,
        real_node_capable: bool | None = None,
    ):
        """``real_node``: also start a real kubelet + containerd node (harness.cluster.realnode)
        after the control plane. ``real_node_capable`` (default: ``real_node``): start the API server
        so that one can be attached later with start_real_node()."""
        self.initial_nodes = nodes
        self.job_pod_duration = job_pod_duration
        self.pod_delete_delay = pod_delete_delay
        self.node_defaults = dict(cpu=node_cpu, memory=node_memory, pods=node_pods, gpus=node_gpus)
        self._workdir_arg = Path(workdir) if workdir else None
        self.keep_workdir = keep_workdir or bool(os.environ.get("KIOSK_KEEP_CLUSTER_DIR"))
        self.detached = detached
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.extra_controller_manager_args = list(extra_controller_manager_args)
        self.real_node_wanted = real_node
        self.real_node_capable = real_node if real_node_capable is None else real_node_capable or real_node
        self.real_node: RealNode | None = None
        self.workdir: Path | None = None
        self.kubeconfig: Path | None = None
        self.server: str | None = None
        self.ports: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.procs: list[cp.Proc] = []
        self._api: KubeApi | None = None
        self._owned = True
        self._node_seq = 0
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

    # ----------------------------------------------------------------- API access

    @property
    def api(self) -> KubeApi:
        """The admin KubeApi (the ``kubernetes`` client)."""
        if self._api is None:
            assert self.kubeconfig is not None, "the cluster is not started"
            self._api = KubeApi(self.kubeconfig)
        return self._api

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30,
                content_type: str = "application/json", query: Mapping[str, str] | None = None) -> Any:
        """Admin request to the API server; returns parsed JSON (None for empty bodies).

        Raises ApiError on HTTP errors (``.status`` is e.g. 404 or 409).
        """
        return self.api.request(method, path, body, timeout=timeout, content_type=content_type, query=query)

    def get(self, path: str, **query: str) -> Any:
        return self.api.get(path, **query)

    def exists(self, path: str) -> bool:
        return self.api.exists(path)

    def apply(self, manifest: str | Mapping[str, Any] | Iterable[Mapping[str, Any]],
              namespace: str | None = None) -> list[dict[str, Any]]:
        """Server-side apply of YAML/JSON text or objects (see KubeApi.apply)."""
        return self.api.apply(manifest, namespace)

    def api_client(self):
        """A new admin ``kubernetes.client.ApiClient`` (typed APIs, watches)."""
        return self.api.new_client()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120,
                kubeconfig: os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run the built kubectl against this cluster (admin unless ``kubeconfig`` given).

        For tests about kubectl itself (printer columns, ``explain``, dry runs, a kubeconfig's
        identity); the harness's own calls go through ``api``.
        """
        argv = [str(binary_path("kubectl")), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def kubectl_json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", **kw).stdout)

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
            if self.real_node_wanted:
                self.start_real_node()
        except BaseException:
            self._stop_real_node()
            self._stop_processes()
            self.keep_workdir = True  # keep logs for the post-mortem
            raise
        self.timings["total"] = time.monotonic() - t0
        return self

    def start_real_node(self) -> RealNode:
        """Attach the real node (idempotent); the API server must be real_node_capable."""
        if self.real_node is not None:
            return self.real_node
        if not self.real_node_capable:
            raise ClusterError("this cluster's API server was not started for a real node "
                               "(LocalCluster(real_node=True) or real_node_capable=True)")
        t0 = time.monotonic()
        self.real_node = RealNode(detached=self.detached).start(self)
        self.timings["real_node"] = time.monotonic() - t0
        return self.real_node

    def stop_real_node(self) -> None:
        """Stop the real node (if any) and delete its Node object; the machine is left as it was."""
        self._stop_real_node()

    def _stop_real_node(self) -> None:
        if self.real_node is not None:
            node, self.real_node = self.real_node, None
            node.stop(delete_node=self if self.procs else None)

    @property
    def owned(self) -> bool:
        """Whether stop() stops the processes (False when attached to someone's detached cluster)."""
        return self._owned

    def _write_config(self) -> None:
        """PKI, the admin kubeconfig, the components' kubeconfigs and kwok's Stages."""
        wd = self.workdir
        assert wd is not None and self.server is not None
        pki.write_pki(self.pki)
        self.kubeconfig = pki.write_kubeconfig(
            wd / "kubeconfig", server=self.server, ca_file=self.ca_file,
            user=pki.client_cert_user(self.pki, "admin", embed=True), embed_ca=True)
        for comp, cert in (("controller-manager", "kcm"), ("scheduler", "scheduler"), ("kwok", "kwok")):
            pki.write_kubeconfig(wd / f"{comp}.kubeconfig", server=self.server, ca_file=self.ca_file,
                                 user=pki.client_cert_user(self.pki, cert, embed=False))
        (wd / "kwok.yaml").write_text(kwok.kwok_config(self.job_pod_duration, self.pod_delete_delay))

    def _start_processes(self, bins: Mapping[str, Path], t0: float) -> None:
        wd = self.workdir
        assert wd is not None
        self.ports = dict(zip(cp.PORT_NAMES, cp.free_ports(len(cp.PORT_NAMES)), strict=True))
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        if self._api is not None:
            self._api.close()
            self._api = None
        self._write_config()
        self.timings["pki"] = time.monotonic() - t0

        etcd_argv, etcd_url = cp.etcd_argv(bins["etcd"], wd, self.ports)
        etcd = self._spawn("etcd", etcd_argv)
        self._wait_ready(etcd, f"{etcd_url}/health",
                         lambda: cp.http_probe(f"{etcd_url}/health", lambda b: '"health":"true"' in b.replace(" ", "")))
        self.timings["etcd"] = time.monotonic() - t0

        api = self._spawn("kube-apiserver", cp.apiserver_argv(
            bins["kube-apiserver"], self.pki, etcd_url, self.ports, self.extra_apiserver_args,
            host_ip=HOST_IP if self.real_node_capable else None))
        self._wait_ready(api, f"{self.server}/readyz", self._apiserver_ready)
        self.timings["apiserver"] = time.monotonic() - t0

        kcm = self._spawn("kube-controller-manager", cp.controller_manager_argv(
            bins["kube-controller-manager"], wd / "controller-manager.kubeconfig", self.pki, self.ports,
            self.extra_controller_manager_args))
        sched = self._spawn("kube-scheduler", cp.scheduler_argv(
            bins["kube-scheduler"], wd / "scheduler.kubeconfig", self.ports))
        kwok_proc = self._spawn("kwok", kwok.kwok_argv(bins["kwok"], wd / "kwok.kubeconfig", wd / "kwok.yaml"),
                                env={"HOME": str(wd)})  # so kwok does not also load ~/.kwok/kwok.yaml

        if self.initial_nodes:
            self.create_nodes(self.initial_nodes, wait=False)
        for proc, port in ((kcm, self.ports["controller_manager"]), (sched, self.ports["scheduler"])):
            url = f"https://127.0.0.1:{port}/healthz"
            self._wait_ready(proc, url, lambda url=url: cp.http_probe(url, lambda b: b.strip() == "ok"))
        self.timings["controllers"] = time.monotonic() - t0
        self._wait_with_procs(lambda: self._sa_exists("default", "default"),
                              "ServiceAccount default/default (controller-manager)")
        if self.initial_nodes:
            self.wait_nodes_ready(procs=[kwok_proc])
        self.timings["nodes"] = time.monotonic() - t0

    def _apiserver_ready(self) -> tuple[bool, str]:
        try:  # listening yet? (saves the client's retries and their log lines)
            socket.create_connection(("127.0.0.1", self.ports["apiserver"]), timeout=2).close()
            answer = self.api.request("GET", "/readyz", timeout=2)
        except (ApiError, OSError) as exc:
            return False, str(exc)[:300]
        return answer.strip() == "ok", str(answer)[:200]

    def stop(self) -> None:
        """Stop all processes (kwok first, etcd last) and remove the workdir unless kept."""
        if not self._owned:
            return
        self._stop_real_node()
        self._stop_processes()
        if self.workdir and not self.keep_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_processes(self) -> None:
        if self._api is not None:
            self._api.close()
        cp.stop_all(self.procs)
        self.procs = []

    # ----------------------------------------------------------------- processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> cp.Proc:
        assert self.workdir is not None
        proc = cp.spawn(name, argv, cwd=self.workdir, log=self.log_path(name), env=env, detached=self.detached)
        self.procs.append(proc)
        return proc

    def _fail(self, proc: cp.Proc, reason: str) -> ClusterStartError:
        return ClusterStartError(
            f"{proc.name} {reason} (workdir {self.workdir}); last lines of {proc.log}:\n{proc.tail()}"
        )

    def _wait_ready(self, proc: cp.Proc, what: str, probe: Callable[[], tuple[bool, str]],
                    timeout: float | None = None) -> None:
        """Poll ``probe`` (-> (ready, last answer)) while ``proc`` runs."""
        last = ""

        def ready() -> bool:
            nonlocal last
            if not proc.alive():
                raise self._fail(proc, f"{proc.exit_desc()} before {what} was ready")
            ok, last = probe()
            return ok

        timeout = timeout or self.start_timeout
        try:
            wait_for(ready, timeout, f"{what} ready", interval=0.1, max_interval=0.1)
        except WaitTimeout:
            raise self._fail(proc, f"not ready at {what} after {timeout:.0f}s (last: {last})") from None

    def _wait_with_procs(self, predicate: Callable[[], Any], message: str, timeout: float | None = None,
                         procs: list[cp.Proc] | None = None) -> Any:
        """wait_for ``predicate`` (API errors count as "not yet"), failing at once if a process dies;
        on timeout the message has the log tails of ``procs`` (default: all)."""
        procs = self.procs if procs is None else procs

        def check() -> Any:
            for p in self.procs:
                if not p.alive():
                    raise self._fail(p, f"{p.exit_desc()} while waiting for {message}")
            return predicate()

        try:
            return wait_for(check, timeout or self.start_timeout, message, ignore=(ApiError, OSError))
        except WaitTimeout as exc:
            tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(15)}" for p in procs)
            raise ClusterStartError(f"{exc}\n{tails}") from None

    # ----------------------------------------------------------------- identities

    def kubeconfig_for_serviceaccount(self, namespace: str, name: str, *, mode: str = "token",
                                      expiration_seconds: int = 86400, path: os.PathLike | None = None) -> Path:
        """Write a kubeconfig that acts as ServiceAccount ``namespace/name`` (exactly its RBAC).

        mode="token" (default): a bound token from the TokenRequest API; works with every
        client, including the Python ``kubernetes`` package. The ServiceAccount must exist.
        mode="impersonate": admin client cert + ``as: system:serviceaccount:ns:name``.
        Only kubectl/client-go honour ``as``; the Python ``kubernetes`` client silently
        ignores it (it would run as cluster-admin), so do not use it for the operator.
        """
        assert self.workdir is not None and self.server is not None
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
            user = {**pki.client_cert_user(self.pki, "admin", embed=True), "as": user_name}
        else:
            raise ValueError(f"mode must be 'token' or 'impersonate', not {mode!r}")
        return pki.write_kubeconfig(out, server=self.server, ca_file=self.ca_file, user=user, embed_ca=True,
                                    namespace=namespace, user_name=user_name)

    # ----------------------------------------------------------------- nodes

    def create_nodes(self, count: int, *, prefix: str = "kwok-node-", cpu: str | None = None,
                     memory: str | None = None, pods: str | None = None, gpus: int | None = None,
                     labels: Mapping[str, str] | None = None, taints: Sequence[Mapping[str, str]] = (),
                     wait: bool = True) -> list[str]:
        """Create ``count`` fake nodes managed by kwok; returns their names."""
        d = self.node_defaults
        resources = {"cpu": cpu or d["cpu"], "memory": memory or d["memory"], "pods": pods or d["pods"],
                     # Every real node reports its disk; worker pods request ephemeral-storage.
                     "ephemeral-storage": "500Gi"}
        g = d["gpus"] if gpus is None else gpus
        if g:
            resources["nvidia.com/gpu"] = str(g)
        names = []
        for _ in range(count):
            name = f"{prefix}{self._node_seq}"
            self._node_seq += 1
            self.request("POST", "/api/v1/nodes", kwok.node_manifest(name, resources, labels, taints))
            names.append(name)
        if wait:
            self.wait_nodes_ready(names)
        return names

    def wait_nodes_ready(self, names: Sequence[str] | None = None, timeout: float | None = None,
                         procs: list[cp.Proc] | None = None) -> None:
        """Wait until the nodes (default: all kwok nodes) are Ready and untainted by the node controller."""
        self._wait_with_procs(lambda: kwok.nodes_ready(self.get("/api/v1/nodes")["items"], names),
                              f"nodes {names or 'all'} Ready", timeout=timeout, procs=procs)

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

    # ----------------------------------------------------------------- detached clusters

    def state(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "kubeconfig": str(self.kubeconfig), "server": self.server,
            "ports": self.ports, "node_seq": self._node_seq,
            "pids": {p.name: p.pid for p in self.procs},
            "exes": {p.name: p.argv[0] for p in self.procs},
            "logs": {p.name: str(p.log) for p in self.procs},
            "started": time.time(),
            "real_node_capable": self.real_node_capable,
            "real_node": self.real_node.state() if self.real_node else None,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None = None, *, owned: bool = False) -> LocalCluster:
        """Attach to a running detached cluster (``make cluster-up``); stop() is a no-op unless ``owned``."""
        if state is None:
            state = json.loads(state_file().read_text())
        c = cls(nodes=0)
        c._owned = owned
        c.workdir = Path(state["workdir"])
        c.kubeconfig = Path(state["kubeconfig"])
        c.server = state["server"]
        c.ports = dict(state["ports"])
        c._node_seq = int(state.get("node_seq", 0))
        c.procs = [cp.Proc(n, [state["exes"][n]], Path(state["logs"][n]), None, pid)
                   for n, pid in state["pids"].items()]
        c.real_node_capable = bool(state.get("real_node_capable"))
        if state.get("real_node"):
            c.real_node = RealNode.from_state(state["real_node"])
        return c

    def alive(self) -> bool:
        node_ok = self.real_node is None or self.real_node.alive()
        return bool(self.procs) and all(p.alive() for p in self.procs) and node_ok
