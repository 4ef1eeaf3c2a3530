"""The control plane's processes: command lines, spawning, health probes and stopping.

    etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler, kwok

all on 127.0.0.1 with free ports. A process started by this interpreter has a Popen; one
of a detached cluster (``cluster up``) is known by its pid (and executable, against pid reuse).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..wait import WaitTimeout, wait_for

SERVICE_CIDR = "10.96.0.0/16"
PORT_NAMES = ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
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


def log_tail(path: Path, lines: int = 40) -> str:
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


def pid_alive(pid: int, exe: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if given, runs executable ``exe``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie
        return False
    return exe is None or cmdline.split(b"\0", 1)[0].decode(errors="replace") == exe


class Proc:
    """One control-plane process and its log file."""

    def __init__(self, name: str, argv: list[str], log: Path, popen: subprocess.Popen | None, pid: int):
        self.name, self.argv, self.log, self.popen, self.pid = name, argv, log, popen, pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid, self.argv[0])

    def exit_desc(self) -> str:
        if self.popen is not None and self.popen.poll() is not None:
            return f"exited with code {self.popen.returncode}"
        return "not running"

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)


def spawn(name: str, argv: list[str], *, cwd: Path, log: Path, env: Mapping[str, str] | None = None,
          detached: bool = False) -> Proc:
    """Start ``argv`` in its own session, logging to ``log``. Unless ``detached``, the process
    gets SIGTERM when this interpreter dies."""
    full_env = dict(os.environ)
    full_env.pop("KUBECONFIG", None)
    full_env.update(env or {})
    with open(log, "ab") as logf:
        logf.write(f"# {' '.join(argv)}\n".encode())
        logf.flush()
        popen = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(cwd), env=full_env, start_new_session=True,
            preexec_fn=None if detached else _set_pdeathsig,
        )
    return Proc(name, argv, log, popen, popen.pid)


def stop_all(procs: Sequence[Proc]) -> None:
    """SIGTERM, then SIGKILL after 10 s, one at a time in reverse start order (clients first:
    kube-apiserver stops slowly, ~10 s, if etcd goes away under it, and quickly otherwise)."""
    for p in reversed(procs):
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


def http_probe(url: str, ok: Callable[[str], bool]) -> tuple[bool, str]:
    """GET a component's own health endpoint (etcd /health, the controllers' /healthz: not the
    Kubernetes API); their serving certificates are self-signed. Returns (ready, last answer)."""
    ctx = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            body = resp.read().decode(errors="replace")
            return ok(body), f"HTTP {resp.status}: {body[:200]}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
    except (OSError, ValueError) as exc:
        return False, repr(exc)


# --------------------------------------------------------------------------- command lines


def etcd_argv(binary: Path, workdir: Path, ports: Mapping[str, int]) -> tuple[list[str], str]:
    """etcd's command line and its client URL."""
    url = f"http://127.0.0.1:{ports['etcd']}"
    peer = f"http://127.0.0.1:{ports['etcd_peer']}"
    return [
        str(binary), "--name=kiosk", f"--data-dir={workdir / 'etcd'}",
        f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kiosk={peer}", "--initial-cluster-state=new",
        "--unsafe-no-fsync=true", "--log-level=warn", "--quota-backend-bytes=4294967296",
    ], url


def apiserver_argv(binary: Path, pki: Path, etcd_url: str, ports: Mapping[str, int],
                   extra: Sequence[str] = (), *, host_ip: str | None = None) -> list[str]:
    """With ``host_ip`` (a real node is or may be attached) the API server also listens where the
    node reaches the host, advertises that address as the ``kubernetes`` Service's endpoint, and
    can call kubelets (logs, exec)."""
    if host_ip:
        network = [
            "--bind-address=0.0.0.0", f"--advertise-address={host_ip}", "--endpoint-reconciler-type=lease",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    else:
        network = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                   "--endpoint-reconciler-type=none"]  # 127.0.0.1 is not a valid Endpoints address
    return [
        str(binary),
        f"--etcd-servers={etcd_url}",
        *network, f"--secure-port={ports['apiserver']}",
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
        "--profiling=false",
        *extra,
    ]


def controller_manager_argv(binary: Path, kubeconfig: Path, pki: Path, ports: Mapping[str, int],
                            extra: Sequence[str] = ()) -> list[str]:
    """All controllers, so Deployments get ReplicaSets and pods, Jobs complete, and deleting an
    owner garbage-collects its children. ``extra`` (e.g. ``--horizontal-pod-autoscaler-sync-period``)
    comes last, so it overrides."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={ports['controller_manager']}",
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
        *extra,
    ]


def scheduler_argv(binary: Path, kubeconfig: Path, ports: Mapping[str, int]) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}",
        "--leader-elect=false",
        "--profiling=false",
        "--kube-api-qps=200", "--kube-api-burst=400",
    ]
