"""KEDA (operator + metrics adapter) as local processes against a harness LocalCluster.

The benchmark compares our operator with KEDA measured on the same cluster, Redis and worker,
so KEDA runs here as it would in a cluster, minus the pods:

- binaries built from the pinned wrapper module by tools/keda/build.sh (``make bench`` only;
  ~15 min cold) into ``${KIOSK_CACHE}/bin/keda-{operator,adapter}-<version>``;
- KEDA's CRDs from the KEDA module in the Go module cache (``go env GOMODCACHE``);
- one CA and one serverAuth+clientAuth leaf (``ca.crt``/``tls.crt``/``tls.key`` in one cert
  dir) for the operator's gRPC metrics service, the adapter's mTLS client and its HTTPS server;
- the aggregation layer: the cluster must be started with ``FrontProxy.apiserver_args()``
  (harness.cluster.aggregation); the adapter gets kubeconfigs for lister, authentication and
  authorization (required outside a cluster), and ``external.metrics.k8s.io`` is registered
  by an APIService whose Service is ``type: ExternalName`` to ``localhost`` (Endpoints refuse
  127.0.0.0/8 addresses);
- everything binds 127.0.0.1; no leader election, no certificate rotation.

Both processes use the admin kubeconfig: the benchmark measures scaling, not KEDA's RBAC.

    fp = FrontProxy(tmp / "front-proxy").write()
    with LocalCluster(extra_apiserver_args=fp.apiserver_args()) as cluster, \
         Keda(cluster, tmp / "keda").start() as keda:
        cluster.apply(scaled_object)
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .cluster import ApiError, LocalCluster
from .cluster import control_plane as cp
from .cluster.aggregation import write_ca, write_signed_leaf
from .cluster.binaries import REPO_ROOT, cache_dir
from .cluster.errors import ClusterError, ClusterStartError
from .ports import free_port
from .wait import WaitTimeout, wait_for

KEDA_MODULE_DIR = REPO_ROOT / "tools" / "keda"
KEDA_BUILD_SCRIPT = KEDA_MODULE_DIR / "build.sh"
KEDA_MODULE = "github.com/kedacore/keda/v2"
EXTERNAL_METRICS_GROUP = "external.metrics.k8s.io"
APISERVICE_NAME = f"v1beta1.{EXTERNAL_METRICS_GROUP}"
METRICS_SERVICE = "keda-metrics-apiserver"
_CERT_SANS = ",".join([
    "DNS:localhost", "IP:127.0.0.1",
    # The aggregator checks the adapter's certificate against its Service's DNS name.
    f"DNS:{METRICS_SERVICE}.{{ns}}.svc", f"DNS:{METRICS_SERVICE}.{{ns}}.svc.cluster.local",
    "DNS:keda-operator.{ns}.svc", "DNS:keda-operator.{ns}.svc.cluster.local",
])


@lru_cache(maxsize=1)
def keda_version() -> str:
    """The KEDA version pinned in tools/keda/build.sh."""
    out = subprocess.run(["bash", str(KEDA_BUILD_SCRIPT), "--print-versions"], check=True,
                         capture_output=True, text=True).stdout
    versions = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return versions["keda-operator"]


def keda_binary(name: str) -> Path:
    """Cache path of ``keda-operator`` or ``keda-adapter`` (may not be built yet)."""
    return cache_dir() / "bin" / f"{name}-{keda_version()}"


def ensure_keda_binaries() -> dict[str, Path]:
    """Build what is missing (tools/keda/build.sh; cold: ~15 minutes on 2 cores)."""
    names = ("keda-operator", "keda-adapter")
    if not all(os.access(keda_binary(n), os.X_OK) for n in names):
        print("[keda] building KEDA (tools/keda/build.sh)", file=sys.stderr, flush=True)
        if subprocess.run(["bash", str(KEDA_BUILD_SCRIPT)]).returncode != 0:
            raise ClusterError(f"{KEDA_BUILD_SCRIPT} failed")
    missing = [n for n in names if not os.access(keda_binary(n), os.X_OK)]
    if missing:
        raise ClusterError(f"KEDA build finished but {missing} are missing")
    return {n: keda_binary(n) for n in names}


def _go() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        raise ClusterError("go not found (KEDA's CRDs are read from its Go module)")
    return go


def keda_module_source() -> Path:
    """KEDA's module source in the Go module cache (downloaded through the proxy if absent)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    out = subprocess.run([_go(), "list", "-m", "-f", "{{.Dir}}", KEDA_MODULE], cwd=KEDA_MODULE_DIR,
                         capture_output=True, text=True, env=env)
    if out.returncode != 0 or not out.stdout.strip():
        subprocess.run([_go(), "mod", "download", KEDA_MODULE], cwd=KEDA_MODULE_DIR, check=True, env=env)
        out = subprocess.run([_go(), "list", "-m", "-f", "{{.Dir}}", KEDA_MODULE], cwd=KEDA_MODULE_DIR,
                             capture_output=True, text=True, check=True, env=env)
    path = Path(out.stdout.strip())
    if not (path / "config" / "crd" / "bases").is_dir():
        raise ClusterError(f"no config/crd/bases in {path}")
    return path


def crd_documents() -> list[dict[str, Any]]:
    """KEDA's CustomResourceDefinitions (ScaledObject, ScaledJob, TriggerAuthentication, ...)."""
    docs: list[dict[str, Any]] = []
    for path in sorted((keda_module_source() / "config" / "crd" / "bases").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def write_certs(cert_dir: Path, namespace: str) -> Path:
    """``ca.crt``, ``tls.crt``, ``tls.key`` in ``cert_dir``: one CA and one serverAuth+clientAuth leaf,
    the layout KEDA's operator and adapter read from ``--cert-dir``."""
    write_ca(cert_dir, "ca", "/CN=kiosk-keda-ca")
    write_signed_leaf(cert_dir, "ca", "tls", "/CN=keda", "serverAuth,clientAuth", _CERT_SANS.format(ns=namespace))
    return cert_dir


class Keda:
    """KEDA's operator and metrics adapter for ``cluster`` (started with the front-proxy flags).

    ``api_timeout``: KEDA_KUBERNETES_API_TIMEOUT. Without it each scale pass gets the polling
    interval as its deadline, and with 1 s polling Job creation fails ("context deadline exceeded").
    """

    def __init__(self, cluster: LocalCluster, workdir: Path | str, *, namespace: str = "keda",
                 watch_namespace: str = "", api_timeout: str = "30s",
                 extra_env: Mapping[str, str] | None = None, operator_args: Sequence[str] = (),
                 start_timeout: float = 120.0) -> None:
        self.cluster, self.dir, self.namespace = cluster, Path(workdir), namespace
        self.watch_namespace, self.api_timeout = watch_namespace, api_timeout
        self.extra_env = dict(extra_env or {})
        self.operator_args = list(operator_args)
        self.start_timeout = start_timeout
        self.procs: list[cp.Proc] = []
        self.ports: dict[str, int] = {}

    @property
    def cert_dir(self) -> Path:
        return self.dir / "certs"

    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def __enter__(self) -> Keda:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Keda:
        """CRDs, namespace, certificates, operator, adapter, APIService; returns when the
        external metrics API is Available."""
        bins = ensure_keda_binaries()
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.install_crds()
        if not self.cluster.exists(f"/api/v1/namespaces/{self.namespace}"):
            self.cluster.create_namespace(self.namespace)
        write_certs(self.cert_dir, self.namespace)
        self.ports = {n: free_port() for n in ("metrics", "health", "grpc", "adapter", "adapter_metrics")}
        try:
            self._start_operator(bins["keda-operator"])
            self._start_adapter(bins["keda-adapter"])
            self._register_apiservice()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the adapter, then the operator; unregister the aggregated API."""
        if self.procs:
            try:
                self.cluster.request("DELETE", f"/apis/apiregistration.k8s.io/v1/apiservices/{APISERVICE_NAME}")
            except (ApiError, OSError):
                pass
        cp.stop_all(self.procs)
        self.procs = []

    def alive(self) -> bool:
        return bool(self.procs) and all(p.alive() for p in self.procs)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(lines)}" for p in self.procs)

    # ----------------------------------------------------------------- pieces

    def install_crds(self) -> None:
        docs = crd_documents()
        self.cluster.apply(docs)
        for doc in docs:
            name = doc["metadata"]["name"]
            wait_for(lambda name=name: _established(self.cluster.get(
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")), 60,
                f"CRD {name} established", ignore=(ApiError,))

    def _env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "KEDA_CLUSTER_OBJECT_NAMESPACE": self.namespace,
            "WATCH_NAMESPACE": self.watch_namespace,
            "POD_NAMESPACE": self.namespace,
            "KEDA_KUBERNETES_API_TIMEOUT": self.api_timeout,
            **self.extra_env,
        }

    def _spawn(self, name: str, argv: list[str]) -> cp.Proc:
        proc = cp.spawn(name, argv, cwd=self.dir, log=self.log_path(name), env=self._env())
        self.procs.append(proc)
        return proc

    def _wait_http(self, proc: cp.Proc, url: str) -> None:
        def ready() -> bool:
            if not proc.alive():
                raise ClusterStartError(f"{proc.name} {proc.exit_desc()}; last lines of {proc.log}:\n{proc.tail()}")
            ok, _ = cp.http_probe(url, lambda body: body.strip() == "ok")
            return ok

        try:
            wait_for(ready, self.start_timeout, f"{proc.name} ready at {url}", interval=0.1, max_interval=0.5)
        except WaitTimeout as exc:
            raise ClusterStartError(f"{exc}\n{proc.tail()}") from None

    def _start_operator(self, binary: Path) -> None:
        p = self.ports
        proc = self._spawn("keda-operator", [
            str(binary),
            "--leader-elect=false",
            "--enable-cert-rotation=false",
            "--enable-webhook-patching=false",
            "--enable-apiservice-patching=false",
            f"--cert-dir={self.cert_dir}",
            f"--metrics-bind-address=127.0.0.1:{p['metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{p['health']}",
            f"--metrics-service-bind-address=127.0.0.1:{p['grpc']}",
            "--zap-log-level=info",
            *self.operator_args,
        ])
        self._wait_http(proc, f"http://127.0.0.1:{p['health']}/readyz")

    def _start_adapter(self, binary: Path) -> None:
        p, kc, certs = self.ports, str(self.cluster.kubeconfig), self.cert_dir
        proc = self._spawn("keda-adapter", [
            str(binary),
            f"--secure-port={p['adapter']}",
            "--bind-address=127.0.0.1",
            f"--cert-dir={certs}",
            f"--tls-cert-file={certs / 'tls.crt'}",
            f"--tls-private-key-file={certs / 'tls.key'}",
            f"--metrics-service-address=127.0.0.1:{p['grpc']}",
            f"--port={p['adapter_metrics']}",
            f"--lister-kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--v=0",
        ])
        self._wait_http(proc, f"https://127.0.0.1:{p['adapter']}/readyz")

    def _register_apiservice(self) -> None:
        port = self.ports["adapter"]
        self.cluster.apply({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": METRICS_SERVICE, "namespace": self.namespace},
            "spec": {"type": "ExternalName", "externalName": "localhost",
                     "ports": [{"name": "https", "port": port, "targetPort": port, "protocol": "TCP"}]},
        })
        self.cluster.apply({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": APISERVICE_NAME},
            "spec": {
                "group": EXTERNAL_METRICS_GROUP, "version": "v1beta1",
                "service": {"name": METRICS_SERVICE, "namespace": self.namespace, "port": port},
                "caBundle": base64.b64encode((self.cert_dir / "ca.crt").read_bytes()).decode(),
                "groupPriorityMinimum": 100, "versionPriority": 100,
            },
        })

        def available() -> bool:
            for proc in self.procs:
                if not proc.alive():
                    raise ClusterStartError(f"{proc.name} {proc.exit_desc()}:\n{proc.tail()}")
            svc = self.cluster.get(f"/apis/apiregistration.k8s.io/v1/apiservices/{APISERVICE_NAME}")
            return any(c["type"] == "Available" and c["status"] == "True"
                       for c in (svc.get("status") or {}).get("conditions") or [])

        try:
            wait_for(available, self.start_timeout, f"APIService {APISERVICE_NAME} Available",
                     ignore=(ApiError,), max_interval=0.5)
        except WaitTimeout as exc:
            svc = self.cluster.get(f"/apis/apiregistration.k8s.io/v1/apiservices/{APISERVICE_NAME}")
            raise ClusterStartError(f"{exc}\nstatus: {svc.get('status')}\n{self.logs(20)}") from None


def _established(crd: Mapping[str, Any]) -> bool:
    return any(c["type"] == "Established" and c["status"] == "True"
               for c in (crd.get("status") or {}).get("conditions") or [])
