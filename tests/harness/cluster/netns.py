"""The real test node's network: a network namespace joined to the host by a veth pair.

    host netns                          netns kiosk-node
    kiosk-h0 10.250.0.1/24  <-- veth -->  kiosk-n0 10.250.0.2/24 (the node's InternalIP)
                                          cni0 bridge 10.251.0.1/24 -> pods 10.251.0.0/24

The node's processes (containerd, kubelet, kube-proxy) are started through ``nsenter --net``:
``ip netns exec`` also remounts /sys, which hides the cgroup mounts the kubelet needs.
Everything the pods reach on the host (API server, Redis, model servers) listens on HOST_IP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import ClusterError

NETNS = "kiosk-node"
NETNS_PATH = Path("/run/netns") / NETNS
HOST_IF, NODE_IF = "kiosk-h0", "kiosk-n0"
HOST_IP, NODE_IP = "10.250.0.1", "10.250.0.2"
NODE_NET_PREFIX = 24
POD_CIDR = "10.251.0.0/24"


class NodeUnsupported(ClusterError):
    """This machine lacks something the real node needs; the message says what, in one line."""


def nsenter(argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the node's network namespace (and nothing else changed)."""
    return ["nsenter", f"--net={NETNS_PATH}", "--", *argv]


def run(argv: Sequence[str], *, check: bool = True, in_netns: bool = False,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run a short command; on failure raise ClusterError with its output."""
    full = nsenter(argv) if in_netns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(full)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return proc


def exists() -> bool:
    return NETNS_PATH.exists()


def setup() -> None:
    """Create the namespace, the veth pair, addresses and routes (after teardown() of any leftover)."""
    teardown()
    run(["ip", "netns", "add", NETNS])
    try:
        run(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NODE_IF])
    except ClusterError as exc:
        raise NodeUnsupported(f"real node: cannot create a veth pair ({exc})") from None
    run(["ip", "link", "set", NODE_IF, "netns", NETNS])
    run(["ip", "addr", "add", f"{HOST_IP}/{NODE_NET_PREFIX}", "dev", HOST_IF])
    run(["ip", "link", "set", HOST_IF, "up"])
    for argv in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", f"{NODE_IP}/{NODE_NET_PREFIX}", "dev", NODE_IF],
        ["ip", "link", "set", NODE_IF, "up"],
        ["ip", "route", "add", "default", "via", HOST_IP],
        ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    ):
        run(argv, in_netns=True)
    # The host reaches pods directly (tests may connect to a pod IP).
    run(["ip", "route", "replace", POD_CIDR, "via", NODE_IP, "dev", HOST_IF])


def teardown() -> None:
    """Delete the namespace (which takes its veth end, bridge, pod interfaces and iptables rules
    with it) and the host's veth end. Idempotent."""
    if NETNS_PATH.exists():
        run(["ip", "netns", "delete", NETNS], check=False)
        if NETNS_PATH.exists():  # `ip netns delete` fails if the mount point is busy
            subprocess.run(["umount", "-l", str(NETNS_PATH)], capture_output=True)
            NETNS_PATH.unlink(missing_ok=True)
    if Path(f"/sys/class/net/{HOST_IF}").exists():
        run(["ip", "link", "delete", HOST_IF], check=False)


def leftovers() -> list[str]:
    """What of the network is still there (empty when torn down)."""
    out = []
    if NETNS_PATH.exists():
        out.append(f"netns {NETNS_PATH}")
    for name in (HOST_IF, NODE_IF):
        if Path(f"/sys/class/net/{name}").exists():
            out.append(f"interface {name}")
    return out


def cni_config(plugin_state: Path) -> dict:
    """The CNI network list for the pods: a bridge (gateway, masquerade) with host-local IPAM
    whose lease files live in ``plugin_state`` (not the system-wide default)."""
    return {
        "cniVersion": "0.4.0",
        "name": "kiosk-pods",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(plugin_state)},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def cni_bin_dir() -> Path:
    """Where Debian's containernetworking-plugins put the plugin binaries."""
    for cand in (Path("/usr/lib/cni"), Path("/opt/cni/bin")):
        if (cand / "bridge").exists():
            return cand
    raise NodeUnsupported("real node: CNI plugins missing (apt-get install containernetworking-plugins)")


def check_tools() -> None:
    """One NodeUnsupported line naming the missing commands, root, or kernel features."""
    if os.geteuid() != 0:
        raise NodeUnsupported("real node: must run as root (network namespaces, cgroups, mounts)")
    need = {"ip": "iproute2", "nsenter": "util-linux", "iptables": "iptables", "conntrack": "conntrack",
            "containerd": "containerd", "ctr": "containerd", "runc": "runc", "buildah": "buildah", "gcc": "gcc"}
    missing = sorted({pkg for cmd, pkg in need.items() if shutil.which(cmd) is None})
    if missing:
        raise NodeUnsupported(f"real node: missing packages: {' '.join(missing)} (make deps installs them)")
    cni_bin_dir()
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise NodeUnsupported("real node: the kernel has no overlay filesystem (containerd's snapshotter)")
    if not Path("/sys/fs/cgroup/memory").is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        raise NodeUnsupported("real node: no memory cgroup mounted under /sys/fs/cgroup")
