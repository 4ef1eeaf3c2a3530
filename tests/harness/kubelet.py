"""A "kubelet player": runs the Running pods of a namespace as local processes.

kwok simulates pods (they become Running but no container runs). For end-to-end
tests this player watches the pods of one namespace that match a label selector
and, for each one kwok made Running, starts its container's command on this
machine (``kiosk-worker`` from the project's venv unless the pod says otherwise)
with the pod's environment, as a kubelet would:

- ``env`` values, ``$(VAR)`` references, ``valueFrom.fieldRef`` (metadata.name,
  namespace, uid, labels/annotations, spec.nodeName, status.podIP...),
  ``secretKeyRef`` / ``configMapKeyRef`` read from the API, ``envFrom`` (with
  prefix and ``optional``); ``HOSTNAME`` is the pod name; ``env_overrides`` win.
- A pod that is deleted (or gets a deletionTimestamp) gets SIGTERM, then
  SIGKILL after its grace period (deletionGracePeriodSeconds or
  terminationGracePeriodSeconds), even if kwok already removed the object.
- ``restartPolicy: Always`` pods are restarted when their process exits; for
  ``Never``/``OnFailure`` pods (Jobs) the exit code is reported by patching the
  pod status to Succeeded or Failed, which the Job controller then counts.
  Such pods must carry the label ``kiosk.deepcell.org/kubelet`` (any value) so
  that kwok does not complete them on its own (see harness.cluster.kwok).

Every process logs to ``<log_dir>/<pod>.log``. Only the first container runs.

    with KubeletPlayer(cluster, ns, "kiosk.deepcell.org/pool=p", {"LOG_LEVEL": "DEBUG"}) as kp:
        wait_for(lambda: kp.running(), 30, "a worker process")
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import HARNESS_KUBELET_LABEL, LocalCluster
from .ports import free_port

log = logging.getLogger("harness.kubelet")

__all__ = ["HARNESS_KUBELET_LABEL", "KubeletPlayer", "PodEnvError", "PodProcess", "container_argv", "pod_env"]

VENV_BIN = Path(sys.executable).parent
# Host variables a local process needs to run at all (a container would get them from its image).
HOST_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "VIRTUAL_ENV", "SSL_CERT_FILE")
DEFAULT_GRACE = 30.0


class PodEnvError(RuntimeError):
    """The pod's environment cannot be built (missing Secret/ConfigMap key): the kubelet's
    CreateContainerConfigError. The player retries at the next resync."""


# --------------------------------------------------------------------------- pure helpers


def _field_path(pod: Mapping[str, Any], path: str) -> str:
    """Value of a downward-API fieldRef, as the kubelet resolves it."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(ip.get("ip", "") for ip in status.get("podIPs") or []),
        "status.hostIPs": ",".join(ip.get("ip", "") for ip in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise PodEnvError(f"unsupported fieldRef fieldPath {path!r}")
    return "" if simple[path] is None else str(simple[path])


_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, text)


def _source(obj: Mapping[str, Any], secret: str, config_map: str) -> tuple[str, Any]:
    return ("Secret", obj[secret]) if secret in obj else ("ConfigMap", obj.get(config_map))


Lookup = Callable[[str, str], "Mapping[str, str] | None"]  # (kind, name) -> data or None if absent


def pod_env(pod: Mapping[str, Any], lookup: Lookup, container: int = 0) -> dict[str, str]:
    """The container's environment from the pod spec alone (no host variables), in kubelet order:
    HOSTNAME, then envFrom sources, then env entries (later wins, ``$(VAR)`` expanded).

    ``lookup(kind, name)`` returns the decoded data of a ``Secret`` or ``ConfigMap``, or None.
    """
    c = (pod.get("spec") or {}).get("containers", [])[container]
    env: dict[str, str] = {"HOSTNAME": str(pod["metadata"]["name"])}
    for src in c.get("envFrom") or []:
        kind, ref = _source(src, "secretRef", "configMapRef")
        if not ref:
            raise PodEnvError(f"unsupported envFrom source {sorted(src)}")
        data = lookup(kind, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise PodEnvError(f"{kind} {ref['name']!r} not found (envFrom)")
        prefix = src.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items()})
    for item in c.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        vf = item["valueFrom"]
        if "fieldRef" in vf:
            env[name] = _field_path(pod, vf["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
            kind, ref = _source(vf, "secretKeyRef", "configMapKeyRef")
            data = lookup(kind, ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                what = f"{kind} {ref['name']!r}"
                if data is not None:
                    what = f"key {ref['key']!r} in {what}"
                raise PodEnvError(f"{what} not found (env {name})")
            env[name] = data[ref["key"]]
        elif "resourceFieldRef" in vf:
            res = vf["resourceFieldRef"]["resource"]  # e.g. limits.cpu
            section, _, rname = res.partition(".")
            env[name] = str(((c.get("resources") or {}).get(section) or {}).get(rname, "0"))
        else:
            raise PodEnvError(f"unsupported valueFrom {sorted(vf)} (env {name})")
    return env


def container_argv(pod: Mapping[str, Any], env: Mapping[str, str], default_command: Sequence[str],
                   container: int = 0) -> list[str]:
    """command + args as the kubelet builds them; ``default_command`` stands for the image entrypoint."""
    c = (pod.get("spec") or {}).get("containers", [])[container]
    command = list(c.get("command") or default_command)
    args = list(c.get("args") or [])
    return [expand(str(a), env) for a in command + args]


def _resolve_exe(argv: list[str], path: str) -> list[str]:
    if argv and "/" not in argv[0]:
        found = shutil.which(argv[0], path=path)
        if found is None:
            raise PodEnvError(f"executable {argv[0]!r} not found on PATH")
        argv = [found, *argv[1:]]
    return argv


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def terminal_status(pod: Mapping[str, Any], exit_code: int, started: str) -> dict[str, Any]:
    """The status patch a kubelet writes when a restartPolicy Never pod's container exits."""
    ok = exit_code == 0
    now = _now()
    reason = "PodCompleted" if ok else "PodFailed"
    conds = [{"type": t, "status": "False", "reason": reason, "lastTransitionTime": now}
             for t in ("Ready", "ContainersReady")]
    statuses = [{
        "name": c["name"], "image": c.get("image", ""), "ready": False, "restartCount": 0, "started": False,
        "state": {"terminated": {"exitCode": int(exit_code), "reason": "Completed" if ok else "Error",
                                 "startedAt": started, "finishedAt": now}},
    } for c in pod["spec"]["containers"]]
    return {"status": {"phase": "Succeeded" if ok else "Failed", "conditions": conds,
                       "containerStatuses": statuses}}


# --------------------------------------------------------------------------- processes


@dataclass
class PodProcess:
    """One local process standing for a pod (the latest incarnation if it was restarted)."""

    pod: str
    uid: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    restart_policy: str
    grace: float
    popen: subprocess.Popen | None = None
    started_at: str = ""
    exit_code: int | None = None
    exit_codes: list[int] = field(default_factory=list)
    restarts: int = 0
    terminating: bool = False  # the pod went away: SIGTERM sent
    kill_at: float | None = None
    restart_at: float | None = None
    reported: str | None = None  # phase patched into the pod (Succeeded/Failed)
    report_due: bool = False  # exited, outcome not yet written to the pod status

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


class KubeletPlayer:
    """Plays kubelet for matching pods in one namespace (see the module docstring).

    ``processes`` maps pod name -> PodProcess (pods seen Running since start, also finished ones).
    ``errors`` maps pod name -> why it could not start (e.g. a missing Secret); retried on resync.
    """

    def __init__(
        self,
        cluster: LocalCluster,
        namespace: str,
        selector: str = "",
        env_overrides: Mapping[str, str] | None = None,
        *,
        log_dir: os.PathLike | str | None = None,
        default_command: Sequence[str] = ("kiosk-worker",),
        resync_seconds: float = 2.0,
        restart_backoff: float = 1.0,
    ) -> None:
        self.cluster, self.namespace, self.selector = cluster, namespace, selector
        self.env_overrides = {k: str(v) for k, v in (env_overrides or {}).items()}
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kubelet-player-"))
        self.default_command = tuple(default_command)
        self.resync_seconds = resync_seconds
        self.restart_backoff = restart_backoff
        self.processes: dict[str, PodProcess] = {}
        self.errors: dict[str, str] = {}
        self._by_uid: dict[str, PodProcess] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._api: Any = None
        self._core: Any = None
        self.thread_error: BaseException | None = None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> KubeletPlayer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> KubeletPlayer:
        from kubernetes import client

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._api = self.cluster.api_client()
        self._core = client.CoreV1Api(self._api)
        for target, name in ((self._watch_loop, "watch"), (self._reap_loop, "reap")):
            t = threading.Thread(target=target, name=f"kubelet-{name}-{self.namespace}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching, SIGTERM every process, SIGKILL what is left after its grace (capped)."""
        self._stop.set()
        with self._lock:
            procs = [p for p in self._by_uid.values() if p.running]
            for p in procs:
                self._terminate(p, min(p.grace, timeout), "player stopping")
        deadline = time.monotonic() + timeout
        for p in procs:
            assert p.popen is not None
            try:
                p.popen.wait(max(0.1, min(p.kill_at or deadline, deadline) - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
            self._record_exit(p)
        for t in self._threads:
            t.join(timeout=self.resync_seconds + 5)
        self._threads = []
        if self._api is not None:
            self._api.close()
            self._api = None

    # ----------------------------------------------------------------- queries

    def running(self) -> list[PodProcess]:
        """Processes alive right now (also those draining after their pod went away)."""
        with self._lock:
            return [p for p in self._by_uid.values() if p.running]

    def describe(self) -> str:
        """One line per process, for assertion messages."""
        with self._lock:
            lines = [f"{p.pod}: pid {p.pid} {'running' if p.running else f'exit {p.exit_code}'} "
                     f"restarts {p.restarts} reported {p.reported} log {p.log_path}"
                     for p in self.processes.values()]
        lines += [f"{pod}: NOT STARTED: {err}" for pod, err in self.errors.items()]
        return "\n".join(lines) or "(no pod processes)"

    def logs(self, tail: int = 1500) -> str:
        with self._lock:
            procs = list(self.processes.values())
        return "\n".join(f"--- {p.pod} ({p.log_path}):\n{p.log(tail)}" for p in procs)

    # ----------------------------------------------------------------- watch

    def _watch_loop(self) -> None:
        """List (reconcile everything), then watch from that resourceVersion; relist every resync."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self._stop.is_set():
            try:
                resp = self._core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                                      _preload_content=False, _request_timeout=10)
                listing = json.loads(resp.data)
                self._resync(listing["items"])
                w = watch.Watch()
                for event in w.stream(self._core.list_namespaced_pod, self.namespace,
                                      label_selector=self.selector,
                                      resource_version=listing["metadata"]["resourceVersion"],
                                      timeout_seconds=max(1, int(self.resync_seconds)),
                                      allow_watch_bookmarks=False, deserialize=False,
                                      _request_timeout=self.resync_seconds + 10):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_pod(event["object"], deleted=event["type"] == "DELETED")
            except ApiException as exc:
                if exc.status not in (410,):
                    log.warning("pod watch in %s failed: %s", self.namespace, exc.reason)
                self._stop.wait(0.2)
            except Exception as exc:  # connection reset, cluster stopping...
                if not self._stop.is_set():
                    log.warning("pod watch in %s failed: %r", self.namespace, exc)
                    self._stop.wait(0.5)

    def _resync(self, pods: list[dict[str, Any]]) -> None:
        seen = set()
        for pod in pods:
            seen.add(pod["metadata"]["uid"])
            self._on_pod(pod)
        with self._lock:
            for uid, p in list(self._by_uid.items()):
                if uid not in seen and p.running and not p.terminating:
                    self._terminate(p, p.grace, "pod gone")

    def _on_pod(self, pod: dict[str, Any], deleted: bool = False) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            proc = self._by_uid.get(uid)
            if deleted or meta.get("deletionTimestamp"):
                if proc is not None and not proc.terminating:
                    grace = meta.get("deletionGracePeriodSeconds")
                    self._terminate(proc, proc.grace if grace is None else float(grace), "pod deleted")
                return
            if proc is not None or (pod.get("status") or {}).get("phase") != "Running" or self._stop.is_set():
                return
            try:
                self._start(pod)
            except PodEnvError as exc:
                if self.errors.get(meta["name"]) != str(exc):
                    log.warning("pod %s/%s cannot start: %s", self.namespace, meta["name"], exc)
                self.errors[meta["name"]] = str(exc)

    # ----------------------------------------------------------------- processes

    def _lookup(self, kind: str, name: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        core = self._core
        read = core.read_namespaced_secret if kind == "Secret" else core.read_namespaced_config_map
        try:
            obj = json.loads(read(name, self.namespace, _preload_content=False, _request_timeout=10).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} \
            if kind == "Secret" else dict(obj.get("data") or {})
        if kind == "ConfigMap":
            data.update({k: base64.b64decode(v).decode(errors="replace")
                         for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        name = meta["name"]
        host = {k: os.environ[k] for k in HOST_ENV if k in os.environ}
        host["PATH"] = os.pathsep.join([str(VENV_BIN), host.get("PATH", os.defpath)])
        env = {**host, **pod_env(pod, self._lookup), **self.env_overrides}
        # Each pod has its own network in a cluster; here every pod shares this host's ports.
        if env.get("METRICS_PORT", "0") != "0" and "METRICS_PORT" not in self.env_overrides:
            env["METRICS_PORT"] = str(free_port())
        argv = _resolve_exe(container_argv(pod, env, self.default_command), env["PATH"])
        proc = PodProcess(
            pod=name, uid=meta["uid"], argv=argv, env=env, log_path=self.log_dir / f"{name}.log",
            restart_policy=spec.get("restartPolicy", "Always"),
            grace=float(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)),
        )
        self.errors.pop(name, None)
        self._spawn(proc)
        self._by_uid[proc.uid] = proc
        self.processes[name] = proc

    def _spawn(self, proc: PodProcess) -> None:
        with open(proc.log_path, "ab") as logf:
            header = f"# [kubelet-player {_now()}] start #{proc.restarts}: {' '.join(proc.argv)}\n"
            logf.write(header.encode())
            logf.flush()
            proc.popen = subprocess.Popen(proc.argv, env=proc.env, stdin=subprocess.DEVNULL,
                                          stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                          cwd=self.log_dir)
        proc.started_at, proc.exit_code, proc.restart_at = _now(), None, None
        log.info("pod %s/%s: started pid %d", self.namespace, proc.pod, proc.popen.pid)

    def _terminate(self, proc: PodProcess, grace: float, why: str) -> None:
        proc.terminating = True
        proc.restart_at = None
        if proc.running:
            assert proc.popen is not None
            proc.kill_at = time.monotonic() + max(0.0, grace)
            self._note(proc, f"SIGTERM ({why}), SIGKILL in {grace:g}s")
            try:
                proc.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _note(self, proc: PodProcess, text: str) -> None:
        with open(proc.log_path, "ab") as logf:
            logf.write(f"# [kubelet-player {_now()}] {text}\n".encode())

    def _record_exit(self, proc: PodProcess) -> bool:
        """Note a finished process once; True the first time."""
        if proc.popen is None or proc.popen.poll() is None or proc.exit_code is not None:
            return False
        proc.exit_code = proc.popen.returncode
        proc.exit_codes.append(proc.exit_code)
        proc.kill_at = None
        self._note(proc, f"exited with {proc.exit_code}")
        return True

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._reap_once()
            except Exception as exc:  # keep reaping; surface the error to tests
                self.thread_error = exc
                log.exception("kubelet player reaper")

    def _reap_once(self) -> None:
        now = time.monotonic()
        with self._lock:
            procs = list(self._by_uid.values())
        for p in procs:
            with self._lock:
                if p.running:
                    if p.kill_at is not None and now >= p.kill_at:
                        self._note(p, "grace period over: SIGKILL")
                        p.popen.kill()  # type: ignore[union-attr]
                        p.kill_at = None
                    continue
                if p.restart_at is not None and now >= p.restart_at and not p.terminating:
                    p.restarts += 1
                    self._spawn(p)
                    continue
                if not self._record_exit(p) or p.terminating:
                    continue
                code = p.exit_code or 0
                if p.restart_policy == "Always" or (p.restart_policy == "OnFailure" and code != 0):
                    p.restart_at = now + self.restart_backoff * (2 ** min(p.restarts, 5))
                    continue
                p.report_due = True
        for p in procs:
            if p.report_due and not p.terminating:
                try:
                    self._report(p, p.exit_code or 0)
                    p.report_due = False
                except Exception as exc:  # API hiccup: retry at the next tick
                    log.warning("pod %s/%s: status report failed: %r", self.namespace, p.pod, exc)

    def _report(self, proc: PodProcess, code: int) -> None:
        """Tell the API server how a run-to-completion pod ended (outside the lock: network)."""
        from kubernetes.client.exceptions import ApiException

        try:
            pod = json.loads(self._core.read_namespaced_pod(proc.pod, self.namespace, _preload_content=False,
                                                            _request_timeout=10).data)
            if pod["metadata"]["uid"] != proc.uid or pod["metadata"].get("deletionTimestamp"):
                return
            self._core.patch_namespaced_pod_status(
                proc.pod, self.namespace, terminal_status(pod, code, proc.started_at),
                _content_type="application/strategic-merge-patch+json", _request_timeout=10)
            proc.reported = "Succeeded" if code == 0 else "Failed"
            self._note(proc, f"pod phase set to {proc.reported}")
        except ApiException as exc:
            if exc.status != 404:
                raise
