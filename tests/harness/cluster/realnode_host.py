"""What the real test node changes on the host, and how to undo it: cgroups, mounts,
processes, kernel sysctls. Every function here is idempotent (cleanup also runs at start,
after a crash).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from ..wait import WaitTimeout, wait_for
from .netns import NodeUnsupported

CGROUP_FS = Path("/sys/fs/cgroup")
# Pods' cgroups go under this parent (the kubelet's cgroupRoot), never under the machine's own.
CGROUP_ROOT = "kiosk-node"
# The kubelet sets these at every start; they are host-wide.
SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops")


# --------------------------------------------------------------------------- sysctls


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    return {n: _sysctl_path(n).read_text().strip() for n in SYSCTLS}


def save_sysctls(state: Path) -> None:
    """Record the host's values before the kubelet first starts (restore_sysctls puts them back)."""
    if state.exists():  # a previous run crashed: its record holds the true original values
        restore_sysctls(state)
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(read_sysctls()) + "\n")
    tmp.replace(state)


def restore_sysctls(state: Path) -> None:
    if not state.exists():
        return
    for name, value in json.loads(state.read_text()).items():
        try:
            _sysctl_path(name).write_text(f"{value}\n")
        except OSError:
            pass
    state.unlink(missing_ok=True)


# --------------------------------------------------------------------------- cgroups (v1 and v2)


def cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies (each v1 controller, and the unified one)."""
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2") and fields[4].startswith(str(CGROUP_FS) + "/"):
            out.append(Path(fields[4]))
    return out


def create_cgroup_root() -> None:
    """Create the pods' parent cgroup in every hierarchy (the kubelet requires it to exist)."""
    hierarchies = cgroup_hierarchies()
    if not hierarchies:
        raise NodeUnsupported("real node: no cgroup hierarchy is mounted under /sys/fs/cgroup")
    for h in hierarchies:
        d = h / CGROUP_ROOT
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            raise NodeUnsupported(f"real node: cannot create cgroup {d} ({exc.strerror})") from None
        for f in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset admits no process
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((h / f).read_text())


def cgroup_dirs() -> list[Path]:
    """Our cgroups in every hierarchy, deepest first."""
    out: list[Path] = []
    for h in cgroup_hierarchies():
        top = h / CGROUP_ROOT
        if top.is_dir():
            out.extend(Path(dp) for dp, _, _ in os.walk(top))
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for d in cgroup_dirs():
        try:
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        except OSError:
            pass
    return pids


def remove_cgroups(timeout: float = 20) -> list[str]:
    """SIGKILL every process in our cgroups, then remove them; returns what could not be removed."""
    left: list[str] = []

    def removed() -> bool:
        for pid in cgroup_pids():
            _kill(pid, signal.SIGKILL)
        left.clear()
        for d in cgroup_dirs():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(f"{d} ({exc.strerror})")
        return not left

    try:
        wait_for(removed, timeout, "our cgroups to be removed", interval=0.1, max_interval=0.1)
    except WaitTimeout:
        pass
    return left


# --------------------------------------------------------------------------- mounts and processes


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base``, deepest first."""
    prefix = str(base.resolve()) if base.exists() else str(base)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_under(base: Path) -> list[str]:
    """Unmount (lazily if busy) everything below ``base``; returns what is still mounted."""
    for _ in range(5):
        points = mounts_under(base)
        if not points:
            return []
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
    return mounts_under(base)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (e.g. our containerd socket's path)."""
    needle = text.encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            pass
    return out


def stop_pids(pids: Iterable[int], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
    pids = list(pids)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not any(_alive(p) for p in pids), grace, "processes to exit", interval=0.05,
                 max_interval=0.2)
    except WaitTimeout:
        pass
    for pid in pids:
        if _alive(pid):
            _kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_pidfile(pidfile: Path, exe_hint: str, grace: float = 10) -> None:
    """Stop the process recorded in ``pidfile`` if it still runs ``exe_hint`` (not a reused pid)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    if exe_hint.encode() in cmdline:
        stop_pids([pid], grace)
    pidfile.unlink(missing_ok=True)
