"""RealNode: a real kubelet + containerd + kube-proxy node joined to a LocalCluster.

The node lives in network namespace ``kiosk-node`` (harness.cluster.netns) at NODE_IP; the
control plane stays in the host's namespace and the node reaches it at HOST_IP, as pods do
(kube-proxy makes the ``kubernetes`` Service work). The node is tainted (TAINT) so that pods
meant for the kwok nodes never land on it; real-node pods carry TOLERATION and NODE_SELECTOR.

One real node per machine (fixed namespace, addresses and cgroup): a file lock serialises
users, and start() first cleans up whatever a crashed run left. The host is changed only in
ways stop() undoes: the namespace and veth pair, the ``kiosk-node`` cgroups, mounts under the
node's directory, and three kernel sysctls the kubelet sets (saved before, restored after).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..wait import WaitTimeout, wait_for
from . import containerd as ctrd
from . import control_plane as cp
from . import netns, pki
from . import realnode_host as host
from .binaries import NODE_BINARIES, cache_dir, ensure_binaries
from .errors import ApiError, ClusterError, ClusterStartError
from .netns import HOST_IP, NODE_IP, POD_CIDR, NodeUnsupported

if TYPE_CHECKING:
    from .local import LocalCluster

NODE_NAME = "kiosk-real-node"
LABEL = "kiosk-operator.test/real-node"
NODE_SELECTOR = {LABEL: "true"}
TAINT = {"key": LABEL, "value": "true", "effect": "NoSchedule"}
TOLERATION = {"key": LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}

__all__ = ["HOST_IP", "LABEL", "NODE_IP", "NODE_NAME", "NODE_SELECTOR", "POD_CIDR", "TAINT", "TOLERATION",
           "NodeUnsupported", "RealNode", "node_dir"]


def node_dir() -> Path:
    """The node's fixed home: run/ (wiped at every start and stop), the lock and the sysctl record."""
    return cache_dir() / "node"


class RealNode:
    """Start with ``start(cluster)`` (the cluster's API server must have been started with
    ``host_ip``: LocalCluster(real_node=True) or real_node_capable=True); ``stop()`` leaves the
    machine as it was (see ``leftovers()``)."""

    def __init__(self, home: Path | None = None, *, start_timeout: float = 120, detached: bool = False):
        self.home = home or node_dir()
        self.run_dir = self.home / "run"
        self.lay = ctrd.Layout(self.run_dir)
        self.sysctl_state = self.home / "sysctls.json"
        self.start_timeout = start_timeout
        self.detached = detached  # processes outlive this interpreter (`cluster up`)
        self.procs: list[cp.Proc] = []
        self.pause_ref = ""
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    # ----------------------------------------------------------------- lifecycle

    def start(self, cluster: LocalCluster, *, lock_timeout: float = 900) -> RealNode:
        """Bring the node up and wait until it is Ready and kube-proxy serves the ``kubernetes`` Service."""
        netns.check_tools()
        bins = ensure_binaries(NODE_BINARIES)
        t0 = time.monotonic()
        self._lock(lock_timeout)
        self._refuse_detached_node()  # before the try: its failure must not clean that node up
        try:
            self.cleanup()
            self.timings["cleanup"] = time.monotonic() - t0
            self.pause_ref, pause_archive = ctrd.ensure_pause_image()
            self.timings["pause_image"] = time.monotonic() - t0
            self.log_dir.mkdir(parents=True, exist_ok=True)
            netns.setup()
            netns.run(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"], in_netns=True, check=False)
            host.create_cgroup_root()
            self._write_config(cluster)
            self._start_containerd()
            ctrd.import_image(self.lay, pause_archive)
            self.timings["containerd"] = time.monotonic() - t0
            host.save_sysctls(self.sysctl_state)
            self._spawn("kubelet", netns.nsenter([str(bins["kubelet"]), *self._kubelet_args()]))
            self._spawn("kube-proxy", netns.nsenter([
                str(bins["kube-proxy"]), f"--config={self.run_dir / 'kube-proxy.yaml'}"]))
            self._wait(lambda: self._node_ready(cluster), f"node {NODE_NAME} Ready")
            self.timings["kubelet"] = time.monotonic() - t0
            self._wait(self._proxy_synced, "kube-proxy rules for the kubernetes Service")
            self.timings["total"] = time.monotonic() - t0
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def stop(self, *, keep_logs: bool = False, delete_node: Any = None) -> None:
        """Stop the processes and undo every host change (idempotent). With ``keep_logs`` the logs
        are moved to ``<home>/last-logs`` for a post-mortem; ``delete_node`` (a LocalCluster)
        also removes the Node object."""
        try:
            if self.procs:
                cp.stop_all(self.procs)
                self.procs = []
            if keep_logs and self.log_dir.exists():
                dest = self.home / "last-logs"
                subprocess.run(["rm", "-rf", str(dest)], capture_output=True)
                subprocess.run(["cp", "-a", str(self.log_dir), str(dest)], capture_output=True)
            self.cleanup()
            if delete_node is not None:
                try:
                    delete_node.request("DELETE", f"/api/v1/nodes/{NODE_NAME}")
                except (ApiError, OSError):
                    pass
        finally:
            self._unlock()

    def cleanup(self) -> None:
        """Undo everything a node run does, whether it ended cleanly or crashed."""
        for name in ("kube-proxy", "kubelet"):
            host.stop_pidfile(self.run_dir / f"{name}.pid", name)
        host.remove_cgroups()  # the containers' processes
        host.stop_pidfile(self.run_dir / "containerd.pid", "containerd")
        host.stop_pids(host.pids_mentioning(str(self.lay.socket)), grace=5)  # shims, containerd
        host.unmount_under(self.run_dir)
        left = host.remove_cgroups()
        netns.teardown()
        host.restore_sysctls(self.sysctl_state)
        if self.run_dir.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.run_dir)], capture_output=True)
        if left:
            raise ClusterError(f"real node cleanup: cgroups left behind: {left}")

    def leftovers(self) -> list[str]:
        """What of the node is still on the machine (empty after stop())."""
        out = netns.leftovers()
        out += [f"cgroup {d}" for d in host.cgroup_dirs()]
        out += [f"mount {m}" for m in host.mounts_under(self.run_dir)]
        out += [f"process {p}" for p in host.pids_mentioning(str(self.lay.socket))]
        if self.sysctl_state.exists():
            out.append(f"sysctl record {self.sysctl_state} (not restored)")
        return out

    def alive(self) -> bool:
        return bool(self.procs) and all(p.alive() for p in self.procs)

    def import_image(self, archive: os.PathLike) -> list[str]:
        """Import an image archive (OCI or docker) into the node's containerd; returns its references.
        Pods must use ``imagePullPolicy: Never`` (or IfNotPresent): no registry is reachable."""
        return ctrd.import_image(self.lay, Path(archive))

    def images(self) -> set[str]:
        return ctrd.image_refs(self.lay)

    # ----------------------------------------------------------------- detached clusters

    def state(self) -> dict[str, Any]:
        return {"home": str(self.home), "pause_ref": self.pause_ref,
                "pids": {p.name: p.pid for p in self.procs}, "exes": {p.name: _exe(p.argv) for p in self.procs},
                "logs": {p.name: str(p.log) for p in self.procs}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RealNode:
        node = cls(Path(state["home"]))
        node.pause_ref = state.get("pause_ref", "")
        node.procs = [cp.Proc(n, [state["exes"][n]], Path(state["logs"][n]), None, pid)
                      for n, pid in state["pids"].items()]
        return node

    # ----------------------------------------------------------------- internals

    def _lock(self, timeout: float) -> None:
        """One node per machine: wait for another user's node to stop."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.home / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)

        def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        try:
            wait_for(take, timeout, f"the real-node lock {self.home / 'node.lock'} (another test run uses it)",
                     interval=0.5, max_interval=2)
        except WaitTimeout:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _refuse_detached_node(self) -> None:
        """A kubelet still running under our lock belongs to a detached cluster (`cluster up`):
        a node started by a test run gets SIGTERM when its interpreter dies."""
        pidfile = self.run_dir / "kubelet.pid"
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            return
        if cp.pid_alive(pid) and b"kubelet" in Path(f"/proc/{pid}/cmdline").read_bytes():
            self._unlock()
            raise ClusterError(f"a detached cluster's real node is running (kubelet pid {pid}); "
                               "stop it first (make cluster-down) or reuse it (KIOSK_USE_RUNNING_CLUSTER=1)")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _spawn(self, name: str, argv: list[str]) -> cp.Proc:
        proc = cp.spawn(name, argv, cwd=self.run_dir, log=self.log_dir / f"{name}.log", detached=self.detached)
        (self.run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
        self.procs.append(proc)
        return proc

    def _wait(self, predicate: Callable[[], Any], what: str) -> None:
        def check() -> Any:
            for p in self.procs:
                if not p.alive():
                    raise ClusterStartError(f"{p.name} {p.exit_desc()} while waiting for {what}; "
                                            f"last lines of {p.log}:\n{p.tail()}")
            return predicate()

        try:
            wait_for(check, self.start_timeout, what, ignore=(ApiError, OSError), max_interval=0.5)
        except WaitTimeout as exc:
            tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(20)}" for p in self.procs)
            raise ClusterStartError(f"{exc}\n{tails}") from None

    def _start_containerd(self) -> None:
        self._spawn("containerd", netns.nsenter(["containerd", f"--config={self.lay.config}"]))
        self._wait(lambda: self.lay.socket.exists() and subprocess.run(
            ["ctr", f"--address={self.lay.socket}", "version"], capture_output=True).returncode == 0,
            "containerd socket")

    def _node_ready(self, cluster: LocalCluster) -> bool:
        node = cluster.get(f"/api/v1/nodes/{NODE_NAME}")
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = {t["key"] for t in node.get("spec", {}).get("taints") or []}
        return conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints

    def _proxy_synced(self) -> bool:
        out = netns.run(["iptables", "-t", "nat", "-S", "KUBE-SERVICES"], in_netns=True, check=False).stdout
        return "10.96.0.1/32" in out

    def _write_config(self, cluster: LocalCluster) -> None:
        """Certificates, kubeconfigs, containerd's, CNI's, the kubelet's and kube-proxy's configs."""
        d, lay = self.run_dir, self.lay
        assert cluster.workdir is not None and cluster.server is not None
        certs = d / "pki"
        certs.mkdir(parents=True, exist_ok=True)
        for f in ("ca.crt", "ca.key"):
            (certs / f).write_bytes((cluster.pki / f).read_bytes())
        pki.write_leaf(certs, "kubelet-client", f"/O=system:nodes/CN=system:node:{NODE_NAME}", "clientAuth")
        pki.write_leaf(certs, "kubelet-serving", f"/O=system:nodes/CN=system:node:{NODE_NAME}", "serverAuth",
                       f"IP:{NODE_IP},DNS:{NODE_NAME}")
        pki.write_leaf(certs, "kube-proxy", "/CN=system:kube-proxy", "clientAuth")
        (certs / "ca.key").unlink()
        server = f"https://{HOST_IP}:{cluster.ports['apiserver']}"
        for name in ("kubelet", "kube-proxy"):
            cert = "kubelet-client" if name == "kubelet" else name
            pki.write_kubeconfig(d / f"{name}.kubeconfig", server=server, ca_file=certs / "ca.crt",
                                 user=pki.client_cert_user(certs, cert, embed=False))
        lay.config.parent.mkdir(parents=True, exist_ok=True)
        lay.config.write_text(ctrd.config_toml(lay, self.pause_ref))
        lay.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        lay.cni_state.mkdir(parents=True, exist_ok=True)
        (lay.cni_conf_dir / "10-kiosk-pods.conflist").write_text(json.dumps(netns.cni_config(lay.cni_state)))
        (d / "kubelet.yaml").write_text(json.dumps(self._kubelet_config(certs), indent=1))
        (d / "kube-proxy.yaml").write_text(json.dumps(self._proxy_config(), indent=1))

    def _kubelet_config(self, certs: Path) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "tlsCertFile": str(certs / "kubelet-serving.crt"), "tlsPrivateKeyFile": str(certs / "kubelet-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(certs / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},  # only holders of our CA's certificates get in
            "containerRuntimeEndpoint": f"unix://{self.lay.socket}",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{host.CGROUP_ROOT}",
            "cgroupsPerQOS": True, "enforceNodeAllocatable": ["pods"],
            "podLogsDir": str(self.run_dir / "pod-logs"),
            # Imported images cannot be pulled again: never collect them.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                             "imagefs.available": "1%"},
            "evictionPressureTransitionPeriod": "10s",
            "resolvConf": "",  # no cluster DNS; pods get the runtime's default
            "failSwapOn": False, "protectKernelDefaults": False, "serializeImagePulls": False,
            "registerWithTaints": [TAINT], "maxPods": 110, "shutdownGracePeriod": "0s",
            "syncFrequency": "10s", "nodeStatusReportFrequency": "10s",
            "runtimeRequestTimeout": "2m", "staticPodPath": "",
            "localStorageCapacityIsolation": True,
        }

    def _kubelet_args(self) -> list[str]:
        return [
            f"--config={self.run_dir / 'kubelet.yaml'}", f"--kubeconfig={self.run_dir / 'kubelet.kubeconfig'}",
            f"--root-dir={self.run_dir / 'kubelet'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}", f"--node-labels={LABEL}=true", "--v=2",
        ]

    def _proxy_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "hostnameOverride": NODE_NAME, "clusterCIDR": POD_CIDR,
            "clientConnection": {"kubeconfig": str(self.run_dir / "kube-proxy.kubeconfig")},
            "bindAddress": NODE_IP, "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
            # Leave the host-wide conntrack table size and timeouts alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
            "nodePortAddresses": [f"{NODE_IP}/32"],
        }


def _exe(argv: list[str]) -> str:
    """The program nsenter executes (what /proc/<pid>/cmdline shows once it runs)."""
    return argv[argv.index("--") + 1] if argv and argv[0] == "nsenter" and "--" in argv else argv[0]
