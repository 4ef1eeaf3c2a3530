"""containerd for the real test node: its config, the pause (sandbox) image, image import.

Everything containerd keeps (root, state, socket, CNI state) lives under one directory of
ours, so cleanup is "unmount and remove that directory". No registry is reachable: every
image is imported from an archive (``ctr -n k8s.io images import``), the sandbox image too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .binaries import REPO_ROOT, cache_dir
from .errors import ClusterError
from .netns import NodeUnsupported, cni_bin_dir

K8S_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
PAUSE_SOURCE = REPO_ROOT / "tools" / "node" / "pause.c"
PAUSE_REPO = "localhost/kiosk-pause"
# Bump when the recipe below changes (part of the archive's cache key).
_PAUSE_RECIPE = "pause-image-v1"


@dataclass(frozen=True)
class Layout:
    """containerd's directories under the node's base directory."""

    base: Path

    @property
    def root(self) -> Path:
        return self.base / "containerd" / "root"

    @property
    def state(self) -> Path:
        return self.base / "containerd" / "state"

    @property
    def socket(self) -> Path:
        return self.base / "containerd" / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.base / "containerd" / "config.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.base / "cni" / "net.d"

    @property
    def cni_state(self) -> Path:
        return self.base / "cni" / "state"


def config_toml(lay: Layout, sandbox_image: str) -> str:
    """containerd config v2: our own paths, cgroupfs, overlayfs, no OOM-score raise (this
    machine does not grant CAP_SYS_RESOURCE), and the sandbox image we import ourselves."""
    return f"""version = 2
root = "{lay.root}"
state = "{lay.state}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{lay.socket}"

[ttrpc]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{lay.base / 'containerd' / 'opt'}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin_dir()}"
    conf_dir = "{lay.cni_conf_dir}"
    max_conf_num = 1
"""


def ctr(lay: Layout, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``ctr`` against our containerd (namespace k8s.io); raise ClusterError on failure."""
    argv = ["ctr", f"--address={lay.socket}", "-n", K8S_NAMESPACE, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def import_image(lay: Layout, archive: Path) -> list[str]:
    """Import an OCI or docker image archive; returns the image references it brought."""
    out = ctr(lay, "images", "import", "--no-unpack=false", "--all-platforms=false", str(archive)).stdout
    refs = []
    for line in out.splitlines():  # "unpacking <ref> (sha256:...)...done"
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "unpacking":
            refs.append(parts[1])
    return refs


def image_refs(lay: Layout) -> set[str]:
    """References of the images containerd has (namespace k8s.io)."""
    return {line.split()[0] for line in ctr(lay, "images", "ls").stdout.splitlines()[1:] if line.strip()}


# --------------------------------------------------------------------------- pause image


def _buildah(storage: Path, *args: str) -> str:
    """buildah on a storage directory of our own (vfs: no mounts, nothing shared with the system)."""
    argv = ["buildah", f"--root={storage / 'root'}", f"--runroot={storage / 'runroot'}",
            "--storage-driver=vfs", *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def pause_key() -> str:
    """Content hash of the pause image's inputs (source, compiler, recipe)."""
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for part in (PAUSE_SOURCE.read_bytes(), "\n".join(gcc).encode(), _PAUSE_RECIPE.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def ensure_pause_image() -> tuple[str, Path]:
    """Build (once per content hash) the pause image archive; returns (reference, archive)."""
    key = pause_key()
    ref = f"{PAUSE_REPO}:{key}"
    images = cache_dir() / "node" / "images"
    archive = images / f"kiosk-pause-{key}.tar"
    if archive.exists():
        return ref, archive
    if shutil.which("gcc") is None or shutil.which("buildah") is None:
        raise NodeUnsupported("real node: gcc and buildah are needed to build the pause image (make deps)")
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiosk-pause-") as tmp_s:
        tmp = Path(tmp_s)
        binary = tmp / "pause"
        proc = subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(binary), str(PAUSE_SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"compiling {PAUSE_SOURCE} failed: {proc.stderr.strip()}"
                               " (static linking needs libc6-dev)")
        storage = tmp / "storage"
        try:
            ctr_id = _buildah(storage, "from", "--pull-never", "scratch")
            _buildah(storage, "copy", "--chmod", "0755", ctr_id, str(binary), "/pause")
            _buildah(storage, "config", "--entrypoint", '["/pause"]', "--cmd", "", "--user", "65535:65535",
                     "--created-by", "kiosk-operator tools/node/pause.c", ctr_id)
            _buildah(storage, "commit", "--rm", "--timestamp", "0", ctr_id, ref)
            partial = archive.with_suffix(f".tmp{os.getpid()}")
            _buildah(storage, "push", ref, f"docker-archive:{partial}:{ref}")
            partial.replace(archive)
        finally:
            # vfs storage holds only plain files; buildah leaves some read-only.
            subprocess.run(["chmod", "-R", "u+w", str(storage)], capture_output=True)
    return ref, archive
