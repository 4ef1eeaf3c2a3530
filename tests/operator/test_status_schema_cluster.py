"""The ConsumerPool's typed status on the real API server: conditions in metav1.Condition's shape,
no field the operator (or kopf) writes pruned, unknown fields pruned, the Ready column."""

from __future__ import annotations

import copy
import types
from typing import Any

import kopf
import pytest

import kiosk_protocol as protocol
from harness.cluster import ApiError
from harness.operator_process import POOLS
from kiosk_operator import handlers
from kiosk_operator.depth import RedisClients
from kiosk_operator.kube import Kube
from kiosk_operator.kube_backend import run_cycle
from kiosk_operator.status import PoolState, set_condition, set_paused
from kiosk_protocol import JobStore

pytestmark = pytest.mark.cluster

VALID = {
    "apiVersion": "kiosk.deepcell.org/v1alpha1",
    "kind": "ConsumerPool",
    "metadata": {"name": "p"},
    "spec": {"queues": ["segmentation"], "worker": {"image": "kiosk-worker:1"}},
}

GOOD = {
    "type": "Ready",
    "status": "True",
    "reason": "DeploymentReady",
    "message": "worker Deployment p-workers",
    "lastTransitionTime": "2026-01-02T03:04:05Z",
    "observedGeneration": 1,
}

# (id, condition list written to status, text the API server's message must contain)
BAD_CONDITIONS = [
    ("no-lastTransitionTime", [{k: v for k, v in GOOD.items() if k != "lastTransitionTime"}], "lastTransitionTime"),
    ("no-reason", [{k: v for k, v in GOOD.items() if k != "reason"}], "reason"),
    ("no-message", [{k: v for k, v in GOOD.items() if k != "message"}], "message"),
    ("empty-reason", [{**GOOD, "reason": ""}], "reason"),
    ("reason-not-camel-case", [{**GOOD, "reason": "not ready!"}], "reason"),
    ("status-yes", [{**GOOD, "status": "Yes"}], "status"),
    ("negative-generation", [{**GOOD, "observedGeneration": -1}], "observedGeneration"),
    ("bad-time", [{**GOOD, "lastTransitionTime": "yesterday"}], "lastTransitionTime"),
    ("type-with-space", [{**GOOD, "type": "Not Ready"}], "type"),
    ("duplicate-type", [GOOD, {**GOOD, "status": "False"}], "Duplicate value"),
]


def _create(k8s_cluster, ns: str) -> str:
    k8s_cluster.request("POST", POOLS.format(ns=ns), copy.deepcopy(VALID))
    return POOLS.format(ns=ns) + "/p"


def _patch_status(k8s_cluster, path: str, status: dict[str, Any]) -> dict[str, Any]:
    return k8s_cluster.request(
        "PATCH", path + "/status", {"status": status}, content_type="application/merge-patch+json"
    )


def test_conditions_in_the_standard_shape_are_accepted(k8s_cluster, k8s_namespace, crd):
    path = _create(k8s_cluster, k8s_namespace)
    state = PoolState(generation=1)
    for ctype, ok in (("Ready", True), ("RedisReachable", False), ("ScalingActive", None)):
        set_condition(state, ctype, ok, "SecretMissing", "Secret redis-auth not found " * 100, 1.7e9)
    set_paused(state, 0, 1.7e9)
    conditions = [state.conditions[c] for c in sorted(state.conditions)]
    _patch_status(k8s_cluster, path, {"conditions": conditions})
    assert k8s_cluster.get(path)["status"]["conditions"] == conditions


@pytest.mark.parametrize("conditions,field", [c[1:] for c in BAD_CONDITIONS], ids=[c[0] for c in BAD_CONDITIONS])
def test_conditions_in_another_shape_are_refused(k8s_cluster, k8s_namespace, crd, conditions, field):
    path = _create(k8s_cluster, k8s_namespace)
    with pytest.raises(ApiError) as err:
        _patch_status(k8s_cluster, path, {"conditions": conditions})
    assert err.value.status == 422, err.value.body
    assert "status.conditions" in err.value.body and field in err.value.body, err.value.body


def test_unknown_status_fields_are_pruned(k8s_cluster, k8s_namespace, crd):
    path = _create(k8s_cluster, k8s_namespace)
    _patch_status(k8s_cluster, path, {"pending": 3, "notAField": 1, "conditions": [{**GOOD, "extra": "x"}]})
    status = k8s_cluster.get(path)["status"]
    assert status == {"pending": 3, "conditions": [GOOD]}


@pytest.mark.parametrize("mode", ["Deployment", "Job"])
def test_every_status_field_the_operator_writes_round_trips(
    k8s_cluster, k8s_namespace, crd, redis_server, redis_client, mode
):
    """run_cycle against the real API server and Redis; whatever it wrote is what the server kept."""
    body = copy.deepcopy(VALID)
    body["spec"]["redis"] = {"host": "127.0.0.1", "port": redis_server.port}
    body["spec"]["scaling"] = {"mode": mode, "maxWorkers": 3, "itemsPerWorker": 1, "batchSize": 1}
    body["spec"]["worker"]["heartbeatIntervalSeconds"] = 1
    pool = k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), body)
    path = POOLS.format(ns=k8s_namespace) + "/p"
    # A gone worker's item (reclaimed), and pending items (a scale-up: lastScaleTime).
    store = JobStore(redis_client, "gone-worker")
    redis_client.rpush("segmentation", "a", "b", "c")
    assert store.pop("segmentation", 0)
    store.heartbeat(["segmentation"], ttl=1)
    redis_client.zadd(protocol.workers_key("segmentation"), {"gone-worker": 1.0})

    kube, clients, state = Kube(k8s_cluster.api_client()), RedisClients(), PoolState()
    try:
        result = run_cycle(kube, clients, pool, state)
    finally:
        clients.close()
    assert result.redis_error is None
    written = state.status
    expected = {
        "pending", "inFlight", "busy", "workers", "desired", "maxWorkers", "reclaimed", "selector",
        "lastScaleTime", "lastActiveTime", "observedGeneration", "conditions",
    } | ({"activeJobs"} if mode == "Job" else set())
    assert set(written) == expected, written
    assert written["reclaimed"] == 1 and written["desired"] == 3
    assert {c["type"] for c in written["conditions"]} == {"Ready", "RedisReachable", "ScalingActive"}
    assert k8s_cluster.get(path)["status"] == written


def test_paused_condition_round_trips_and_goes_away(k8s_cluster, k8s_namespace, crd, redis_server):
    body = copy.deepcopy(VALID)
    body["spec"]["redis"] = {"host": "127.0.0.1", "port": redis_server.port}
    body["spec"]["scaling"] = {"maxWorkers": 0}
    pool = k8s_cluster.request("POST", POOLS.format(ns=k8s_namespace), body)
    path = POOLS.format(ns=k8s_namespace) + "/p"
    kube, clients, state = Kube(k8s_cluster.api_client()), RedisClients(), PoolState()
    try:
        run_cycle(kube, clients, pool, state)
        status = k8s_cluster.get(path)["status"]
        paused = next(c for c in status["conditions"] if c["type"] == "Paused")
        assert paused["status"] == "True" and paused["observedGeneration"] == 1
        assert status["maxWorkers"] == 0
        pool = k8s_cluster.request(
            "PATCH", path, {"spec": {"scaling": {"maxWorkers": 2}}}, content_type="application/merge-patch+json"
        )
        run_cycle(kube, clients, pool, state)
    finally:
        clients.close()
    status = k8s_cluster.get(path)["status"]
    assert "Paused" not in {c["type"] for c in status["conditions"]}
    assert status["maxWorkers"] == 2
    assert {c["observedGeneration"] for c in status["conditions"]} == {2}


def test_operator_settings_keep_kopf_state_out_of_status():
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings, memo=types.SimpleNamespace(kube=object()))
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)


def _apply_kopf_patch(k8s_cluster, path: str, patch: kopf.Patch) -> dict[str, Any]:
    """Apply a kopf Patch as kopf does: metadata to the object, status to the status subresource."""
    if "status" in patch:
        k8s_cluster.request("PATCH", path + "/status", {"status": patch["status"]},
                            content_type="application/merge-patch+json")
    rest = {k: v for k, v in patch.items() if k != "status"}
    if rest:
        k8s_cluster.request("PATCH", path, rest, content_type="application/merge-patch+json")
    return k8s_cluster.get(path)


@pytest.mark.parametrize("storage", ["configured", "kopf-default"])
def test_what_kopf_writes_survives_the_typed_status(k8s_cluster, k8s_namespace, crd, storage):
    """Handler progress from the operator's storage, and from kopf's default one (which also writes
    status.kopf), reads back from the API server."""
    if storage == "configured":
        settings = kopf.OperatorSettings()
        handlers.configure(settings=settings, memo=types.SimpleNamespace(kube=object()))
        progress = settings.persistence.progress_storage
    else:
        progress = kopf.StatusProgressStorage()  # the status half of kopf's default SmartProgressStorage
    path = _create(k8s_cluster, k8s_namespace)
    body = kopf.Body(k8s_cluster.get(path))
    record = {"started": "2026-01-02T03:04:05.000000+00:00", "retries": 2, "success": False, "failure": False,
              "message": "retrying", "delayed": "2026-01-02T03:05:05.000000+00:00"}
    patch = kopf.Patch()
    progress.store(key=kopf.HandlerId("reconcile_pool"), record=record, body=body, patch=patch)
    progress.touch(body=body, patch=patch, value="dummy-1")
    stored = kopf.Body(_apply_kopf_patch(k8s_cluster, path, patch))
    fetched = progress.fetch(key=kopf.HandlerId("reconcile_pool"), body=stored)
    assert fetched is not None and {k: fetched.get(k) for k in record} == record
    if storage == "configured":
        assert "kopf" not in stored.get("status", {})
    else:
        assert stored["status"]["kopf"]["dummy"] == "dummy-1"


def test_kubectl_get_shows_ready(k8s_cluster, k8s_namespace, crd):
    path = _create(k8s_cluster, k8s_namespace)

    def ready_column() -> str:
        lines = k8s_cluster.kubectl("get", "consumerpools", "-n", k8s_namespace).stdout.splitlines()
        start = lines[0].index("READY")  # cells are aligned under their header; an empty one is blank
        return lines[1][start:].split(" ", 1)[0]

    assert ready_column() == ""
    _patch_status(k8s_cluster, path, {"conditions": [{**GOOD, "status": "False"}]})
    assert ready_column() == "False"
