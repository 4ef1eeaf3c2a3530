"""Helpers for the operator tests: pool manifests, the operator process, API shortcuts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import rbac
from harness.cluster import ApiError, LocalCluster
from harness.ports import free_port
from harness.procs import stop_process
from harness.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "consumerpool.yaml"
POOLS = "/apis/kiosk.deepcell.org/v1alpha1/namespaces/{ns}/consumerpools"
OPERATOR_SA = "kiosk-operator"


def pool_manifest(name: str, redis_port: int, **spec_overrides: Any) -> dict[str, Any]:
    """A small valid ConsumerPool pointing at the test Redis; overrides merge into spec."""
    spec: dict[str, Any] = {
        "queues": ["segmentation"],
        "consumerType": "segmentation",
        "worker": {
            "image": "example.invalid/kiosk-worker:test",
            "graceSeconds": 5,
            "terminationGracePeriodSeconds": 10,
        },
        "redis": {"host": "127.0.0.1", "port": redis_port},
        "modelServer": {"host": "tf-serving", "port": 8500},
        "storage": {"bucket": "s3://results"},
        "scaling": {
            "minWorkers": 0,
            "maxWorkers": 5,
            "itemsPerWorker": 10,
            "pollingIntervalSeconds": 0.3,
            "cooldownSeconds": 2,
        },
    }
    _merge(spec, spec_overrides)
    return {
        "apiVersion": "kiosk.deepcell.org/v1alpha1",
        "kind": "ConsumerPool",
        "metadata": {"name": name},
        "spec": spec,
    }


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


class OperatorProcess:
    """`kiosk-operator --namespace NS` running as the kiosk-operator ServiceAccount (exact RBAC)."""

    def __init__(self, cluster: LocalCluster, namespace: str, workdir: Path) -> None:
        self.cluster, self.namespace, self.workdir = cluster, namespace, workdir
        self.log_path = workdir / f"operator-{namespace}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.health_port = free_port()
        for obj in rbac.namespaced_manifests(OPERATOR_SA, namespace):
            cluster.apply(json.dumps(obj), namespace=namespace)
        self.kubeconfig = cluster.kubeconfig_for_serviceaccount(namespace, OPERATOR_SA)

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        argv = [
            sys.executable,
            "-m",
            "kiosk_operator",
            "--namespace",
            self.namespace,
            "--metrics-port",
            str(self.metrics_port),
            "--liveness",
            f"http://127.0.0.1:{self.health_port}/healthz",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wait_for(self._healthy, 60, "operator liveness endpoint", ignore=(OSError,))
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as resp:
            return resp.status == 200

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def log(self, tail: int = 8000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc = None


# --- small API helpers used by the tests -----------------------------------------------------


class Api:
    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.c, self.ns = cluster, namespace

    def create_pool(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.c.request("POST", POOLS.format(ns=self.ns), manifest)

    def pool(self, name: str) -> dict[str, Any]:
        return self.c.get(POOLS.format(ns=self.ns) + "/" + name)

    def patch_pool(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.c.request(
            "PATCH", POOLS.format(ns=self.ns) + "/" + name, patch, content_type="application/merge-patch+json"
        )

    def delete_pool(self, name: str) -> None:
        self.c.request("DELETE", POOLS.format(ns=self.ns) + "/" + name)

    def deployment(self, name: str) -> dict[str, Any] | None:
        try:
            return self.c.get(f"/apis/apps/v1/namespaces/{self.ns}/deployments/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def patch_deployment(
        self, name: str, patch: Any, content_type: str = "application/merge-patch+json"
    ) -> Any:
        return self.c.request(
            "PATCH",
            f"/apis/apps/v1/namespaces/{self.ns}/deployments/{name}",
            patch,
            content_type=content_type,
        )

    def replicas(self, name: str) -> int | None:
        dep = self.deployment(name)
        return None if dep is None else int(dep["spec"].get("replicas") or 0)

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return self.c.get(f"/api/v1/namespaces/{self.ns}/pods", labelSelector=selector)["items"]

    def events(self, involved: str) -> list[dict[str, Any]]:
        items = self.c.get(f"/api/v1/namespaces/{self.ns}/events")["items"]
        return [e for e in items if e.get("involvedObject", {}).get("name") == involved]

    def wait_events(self, involved: str, reason: str, timeout: float = 30.0,
                    until: Callable[[list[dict[str, Any]]], bool] = bool) -> list[dict[str, Any]]:
        """Events of ``reason`` about ``involved``, once ``until`` holds for them.

        kopf posts events from a background task, so one may land after the state change
        a test just waited for: wait for it too.
        """
        def found() -> list[dict[str, Any]] | None:
            events = [e for e in self.events(involved) if e.get("reason") == reason]
            return events if until(events) else None

        return wait_for(found, timeout, f"a {reason} event about {involved}")

    def condition(self, pool: str, ctype: str) -> dict[str, Any] | None:
        for cond in self.pool(pool).get("status", {}).get("conditions", []):
            if cond["type"] == ctype:
                return cond
        return None
