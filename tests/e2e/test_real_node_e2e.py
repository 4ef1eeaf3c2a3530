"""End to end on the real node (kubelet + containerd): nothing here is played by the harness.

The chart is installed with ``helm`` into a namespace that enforces the ``restricted`` Pod
Security Standard; the operator runs as the chart's pod with its ServiceAccount only. Jobs are
submitted with ``kiosk submit --wait`` as a user would; real worker pods (Dockerfile.worker)
take them from Redis on the host, call a model-server pod through its Service, and write results
to a GCS emulator; results are compared with the synthetic ground truth. The kubelet delivers
SIGTERM on scale-down, the Job controller completes and removes worker Jobs, and the model-server
Deployment follows the pool 0 -> 1 -> 0. Faults (SIGKILL, OOM) are in test_real_node_e2e_faults.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import tifffile
from e2e_support import mean_matched_iou

import kiosk_protocol as protocol
from harness.cluster import NODE_NAME, ApiError
from harness.operator_fixtures import call_failed
from harness.realnode_e2e import (
    PodLogs,
    RealNodeE2E,
    create_model_server,
    diagnostics,
    kiosk_env,
    kiosk_submit,
    operator_pod,
    real_node_e2e,  # noqa: F401 (module fixture)
    real_pool,
    wait_pods_gone,
)
from harness.wait import wait_for
from kiosk_model_server.synthetic import make_cells
from kiosk_operator import manifests

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

T = 120
STOP_LINE = re.compile(r"worker (\S+) stopped after (\d+) items \((\d+) done, (\d+) failed\)")


# --------------------------------------------------------------------------- helpers


def write_cells(folder: Path, count: int, seed: int = 0, shape: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
    """``count`` synthetic cell images as TIFF files; file name -> true labels."""
    folder.mkdir(parents=True, exist_ok=True)
    truths = {}
    for i in range(count):
        image, labels = make_cells(shape, 8, seed=seed + i)
        name = f"cells-{seed + i}.tif"
        tifffile.imwrite(folder / name, image)
        truths[name] = labels
    return truths


def jobs_of(client: redis.Redis, queue: str) -> dict[str, dict[str, str]]:
    """Every job hash of ``queue`` (job keys start with the queue's name)."""
    return {key: client.hgetall(key) for key in client.scan_iter(match=f"{queue}:*", _type="hash")}


def result_labels(path: Path) -> np.ndarray:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        (member,) = zf.namelist()
        with zf.open(member) as fh:
            return tifffile.imread(fh)


def check_results(jobs: dict[str, dict[str, str]], truths: dict[str, np.ndarray], out: Path,
                  workers: set[str]) -> None:
    """Each file submitted once, done by one of ``workers``, with labels matching its ground truth."""
    assert sorted(j["original_name"] for j in jobs.values()) == sorted(truths), jobs
    for key, job in jobs.items():
        assert job["status"] == "done", (key, job)
        assert job["identity_started"] in workers, (key, job["identity_started"], workers)
        local = out / Path(job["output_file_name"] or job["output_url"]).name
        iou = mean_matched_iou(result_labels(local), truths[job["original_name"]])
        assert iou >= 0.8, (key, iou)


def stop_lines(logs: PodLogs) -> dict[str, tuple[int, int, int]]:
    """Per container instance: (items taken, done, failed) from the worker's last log line."""
    out = {}
    for instance, text in logs.texts().items():
        found = STOP_LINE.findall(text)
        if found:
            _, taken, done, failed = found[-1]
            out[instance] = (int(taken), int(done), int(failed))
    return out


def communicate(proc: Any, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"kiosk submit did not finish in {timeout}s:\n{out[-3000:]}\n{err[-3000:]}") from None


def condition(e: RealNodeE2E, pool: str, ctype: str) -> bool:
    conds = e.pool(pool).get("status", {}).get("conditions") or []
    return any(c["type"] == ctype and c["status"] == "True" for c in conds)


@pytest.fixture
def e(real_node_e2e: RealNodeE2E, request: pytest.FixtureRequest) -> Iterator[RealNodeE2E]:  # noqa: F811
    """The module's world; a clean Redis; diagnostics (pods, logs, events) when the test failed."""
    real_node_e2e.redis.client().flushall()
    yield real_node_e2e
    if call_failed(request):
        print(diagnostics(real_node_e2e.cluster, real_node_e2e.namespace))
        op = operator_pod(real_node_e2e.cluster, real_node_e2e.namespace)
        if op:
            print("--- operator log (tail)\n" + str(real_node_e2e.cluster.request(
                "GET", f"/api/v1/namespaces/{real_node_e2e.namespace}/pods/{op['metadata']['name']}/log",
                query={"tailLines": "150"})))


@pytest.fixture
def watch_pool(e: RealNodeE2E, request: pytest.FixtureRequest) -> Iterator[Callable[[str], PodLogs]]:
    """Follow the worker logs of a pool; on failure they are printed."""
    started: list[PodLogs] = []

    def start(pool: str) -> PodLogs:
        logs = PodLogs(e.cluster, e.namespace, f"{manifests.POOL_LABEL}={pool}", manifests.WORKER_CONTAINER)
        started.append(logs.start())
        return logs

    yield start
    for logs in started:
        logs.stop(timeout=5)
        if call_failed(request):
            print(f"--- worker logs ({logs.selector})\n{logs.all_text()[-20000:]}")


def start_pool(e: RealNodeE2E, pool: str, queue: str, *, latency_ms: float = 0,
               extra_env: dict[str, str] | None = None, **overrides: Any) -> str:
    """A model server (0 replicas) and a pool using it; returns the model server's name."""
    tfs = f"{pool}-tfs"
    host = create_model_server(e.cluster, e.namespace, tfs, e.worker.ref, latency_ms)
    manifest = real_pool(pool, queue, image=e.worker.ref, redis=e.redis, gcs=e.gcs, bucket=e.bucket,
                         model_host=host, model_deployment=tfs, **overrides)
    manifest["spec"]["worker"]["env"] += [{"name": k, "value": v} for k, v in (extra_env or {}).items()]
    e.create(manifest)
    wait_for(lambda: condition(e, pool, "RedisReachable"), T, f"pool {pool} measured by the operator",
             ignore=(ApiError, KeyError))
    return tfs


def end_pool(e: RealNodeE2E, pool: str, tfs: str) -> None:
    e.delete_pool(pool)
    e.cluster.request("DELETE", f"/apis/apps/v1/namespaces/{e.namespace}/deployments/{tfs}")
    e.cluster.request("DELETE", f"/api/v1/namespaces/{e.namespace}/services/{tfs}")


# --------------------------------------------------------------------------- tests


def test_operator_runs_as_a_pod_with_the_charts_service_account_only(e: RealNodeE2E) -> None:
    pod = operator_pod(e.cluster, e.namespace)
    assert pod is not None
    spec = pod["spec"]
    assert spec["nodeName"] == NODE_NAME
    assert spec["serviceAccountName"] == "kiosk-operator"
    (container,) = spec["containers"]
    assert container["image"] == e.operator.ref and container["imagePullPolicy"] == "Never"
    # No kubeconfig of ours anywhere: no variable, no Secret or hostPath volume, only the token the
    # kubelet projects for the ServiceAccount and the scratch /tmp.
    assert not [v for v in container.get("env", []) if "KUBECONFIG" in v["name"]]
    assert not [a for a in container.get("args", []) if "kubeconfig" in a.lower()]
    kinds = {v["name"]: sorted(set(v) - {"name"}) for v in spec["volumes"]}
    assert kinds.pop("tmp") == ["emptyDir"]
    assert all(k == ["projected"] for k in kinds.values()), kinds
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, status
    # Its identity is the ServiceAccount: the API server says so in the audit of its own requests
    # (the pool status written in the next tests); here, that it may not read Secrets it was not given.
    sa = f"system:serviceaccount:{e.namespace}:kiosk-operator"
    review = e.cluster.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": sa, "groups": ["system:serviceaccounts"],
                 "resourceAttributes": {"namespace": "kube-system", "verb": "get", "resource": "secrets"}}})
    assert review["status"]["allowed"] is False
    # The namespace really enforces `restricted`: a pod without the profile is refused.
    with pytest.raises(ApiError) as refused:
        e.cluster.request("POST", f"/api/v1/namespaces/{e.namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "loose"},
            "spec": {"containers": [{"name": "c", "image": e.worker.ref}]}})
    assert refused.value.status == 403


def test_cli_jobs_run_on_real_worker_pods_and_the_model_server_follows_the_pool(
        e: RealNodeE2E, watch_pool: Callable[[str], PodLogs], tmp_path: Path) -> None:
    pool, queue, count = "seg", "seg-q", 8
    logs = watch_pool(pool)
    tfs = start_pool(e, pool, queue, scaling={"maxWorkers": 2, "itemsPerWorker": 4})
    workers = manifests.deployment_name(pool)
    wait_for(lambda: e.replicas(workers) == 0, T, "worker Deployment created at 0", ignore=(ApiError,))
    assert e.replicas(tfs) == 0  # idle pool: no model server either

    truths = write_cells(tmp_path / "images", count)
    out = tmp_path / "results"
    proc = kiosk_submit([tmp_path / "images"], queue, out, kiosk_env(e.redis, e.gcs, e.bucket), timeout=400)
    # The model server follows the pool: 0 -> 1, a real pod that becomes Ready on the node.
    wait_for(lambda: e.replicas(tfs) == 1, T, "model server scaled to 1 with the pool")
    selector = f"app.kubernetes.io/instance={tfs}"
    ready = wait_for(lambda: [p for p in e.pods(selector) if p["status"].get("containerStatuses")
                              and p["status"]["containerStatuses"][0].get("ready")], T, "model server pod Ready")
    assert ready[0]["spec"]["nodeName"] == NODE_NAME
    stdout, stderr = communicate(proc, 420)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"{count} jobs done" in stdout, stdout[-2000:]

    jobs = jobs_of(e.redis.client(), queue)
    pods = set(logs.nodes)
    check_results(jobs, truths, out, pods)
    assert pods and set(logs.nodes.values()) == {NODE_NAME}, logs.nodes
    client = e.redis.client()
    assert client.llen(queue) == 0
    assert all(client.llen(protocol.processing_key(queue, p)) == 0 for p in pods)

    # Idle after the cooldown: workers and model server back to 0, their pods gone.
    wait_for(lambda: e.replicas(workers) == 0 and e.replicas(tfs) == 0, T, "pool and model server back to 0")
    wait_pods_gone(e.cluster, e.namespace, f"{manifests.POOL_LABEL}={pool}", T)
    wait_pods_gone(e.cluster, e.namespace, selector, T)
    logs.stop()
    stops = stop_lines(logs)
    assert len(stops) == len(logs.texts()), logs.all_text()[-5000:]  # every worker drained and exited
    assert sum(done for _, done, _ in stops.values()) == count, stops  # each job done exactly once
    status = wait_for(lambda: (s := e.pool(pool).get("status", {})).get("workers") == 0 and s, T, "status 0 workers")
    assert (status["pending"], status["inFlight"]) == (0, 0), status
    wait_for(lambda: {"ScaledUp", "ScaledDown"} <= {ev["reason"] for ev in e.events(pool)}, 30,
             "ScaledUp and ScaledDown events about the pool")
    end_pool(e, pool, tfs)


def test_scale_down_under_load_sigterm_loses_and_repeats_nothing(
        e: RealNodeE2E, watch_pool: Callable[[str], PodLogs], tmp_path: Path) -> None:
    """Three busy workers; one is deleted mid-job (the kubelet's SIGTERM reaches a worker holding
    an item, as on a drain or a scale-down that picks it) and the pool's maxWorkers drops to 1 (the
    operator removes workers as they go idle: its busy floor never picks one holding an item). Every
    SIGTERMed worker finishes its item within graceSeconds and exits cleanly; every job ends done
    exactly once, the deleted pod's in-flight item by that pod."""
    pool, queue, count = "drain", "drain-q", 18
    logs = watch_pool(pool)
    tfs = start_pool(e, pool, queue, latency_ms=1500,
                     scaling={"maxWorkers": 3, "itemsPerWorker": 2, "cooldownSeconds": 5},
                     worker={"graceSeconds": 30, "terminationGracePeriodSeconds": 45})
    truths = write_cells(tmp_path / "images", count)
    out = tmp_path / "results"
    proc = kiosk_submit([tmp_path / "images"], queue, out, kiosk_env(e.redis, e.gcs, e.bucket), timeout=600)
    client = e.redis.client()

    def busy() -> dict[str, str]:
        held = {}
        for p in e.pods(f"{manifests.POOL_LABEL}={pool}"):
            name = p["metadata"]["name"]
            items = client.lrange(protocol.processing_key(queue, name), 0, -1)
            if items and not p["metadata"].get("deletionTimestamp"):
                held[name] = items[0]
        return held

    held = wait_for(lambda: b if len(b := busy()) == 3 else None, 240, "3 workers each holding an item")
    victim, item = sorted(held.items())[0]
    e.cluster.request("DELETE", f"/api/v1/namespaces/{e.namespace}/pods/{victim}")
    e.cluster.request("PATCH", f"{e.pools_path()}/{pool}", {"spec": {"scaling": {"maxWorkers": 1}}},
                      content_type="application/merge-patch+json")
    wait_for(lambda: e.replicas(manifests.deployment_name(pool)) <= 1, T, "the operator scaled the pool down")
    stdout, stderr = communicate(proc, 600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    jobs = jobs_of(client, queue)
    check_results(jobs, truths, out, set(logs.nodes))
    # The item the deleted pod held when SIGTERM came was finished by that pod, once.
    assert jobs[item]["identity_started"] == victim, jobs[item]
    for key, job in jobs.items():
        assert job.get("attempts", "1") == "1", (key, job)  # no worker died holding it, none re-took it

    wait_for(lambda: e.replicas(manifests.deployment_name(pool)) == 0, T, "pool back to 0")
    wait_pods_gone(e.cluster, e.namespace, f"{manifests.POOL_LABEL}={pool}", T)
    logs.stop()
    texts = logs.texts()
    victim_log = next(t for k, t in texts.items() if k.startswith(f"{victim}#"))
    assert "received SIGTERM" in victim_log, victim_log[-3000:]
    assert "grace period of" not in logs.all_text(), logs.all_text()[-5000:]  # nothing cut short
    assert "returned held item" not in logs.all_text()  # nothing given back
    sigtermed = [k for k, t in texts.items() if "received SIGTERM" in t]
    assert len(sigtermed) == len(texts) >= 3, list(texts)  # every worker stopped by the kubelet's SIGTERM
    stops = stop_lines(logs)
    assert len(stops) == len(texts), logs.all_text()[-5000:]
    assert sum(done for _, done, _ in stops.values()) == count, stops  # each job done exactly once
    assert not client.llen(queue)
    end_pool(e, pool, tfs)


def test_job_mode_worker_jobs_run_complete_and_are_removed_by_the_job_controller(
        e: RealNodeE2E, watch_pool: Callable[[str], PodLogs], tmp_path: Path) -> None:
    pool, queue, count, batch = "batch", "batch-q", 9, 3
    logs = watch_pool(pool)
    truths = write_cells(tmp_path / "images", count)
    out = tmp_path / "results"
    jobs_path = f"/apis/batch/v1/namespaces/{e.namespace}/jobs"
    selector = manifests.label_selector(pool, manifests.JOB_COMPONENT)
    # Every item is queued before the pool exists, so the operator sees the whole depth at once.
    proc = kiosk_submit([tmp_path / "images"], queue, out, kiosk_env(e.redis, e.gcs, e.bucket), timeout=400)
    wait_for(lambda: e.redis.client().llen(queue) == count, 60, f"{count} items queued by kiosk submit")
    tfs = start_pool(e, pool, queue, scaling={"mode": "Job", "maxWorkers": 4, "batchSize": batch, "job": {
        "ttlSecondsAfterFinished": 5, "successfulJobsHistoryLimit": 20}})
    seen: dict[str, dict[str, Any]] = {}

    def finished() -> bool:
        for job in e.cluster.get(jobs_path, labelSelector=selector)["items"]:
            seen[job["metadata"]["name"]] = job
        return proc.poll() is not None

    wait_for(finished, 420, "kiosk submit --wait to finish", max_interval=0.5)
    stdout, stderr = communicate(proc, 10)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    check_results(jobs_of(e.redis.client(), queue), truths, out, set(logs.nodes))
    assert seen, "no worker Job was seen"
    assert len(seen) == -(-count // batch), sorted(seen)  # exactly ceil(9 / 3) = 3 Jobs, never more

    def complete(job: dict[str, Any]) -> bool:
        conds = job.get("status", {}).get("conditions", [])
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conds)

    def all_complete_then_removed() -> bool:
        items = e.cluster.get(jobs_path, labelSelector=selector)["items"]
        for job in items:
            seen[job["metadata"]["name"]] = job
            assert not any(c["type"] == "Failed" and c["status"] == "True"
                           for c in job.get("status", {}).get("conditions", [])), job["status"]
        return not items

    # ttlSecondsAfterFinished: the TTL-after-finished controller deletes each finished Job (and its pods).
    wait_for(all_complete_then_removed, T, "worker Jobs finished and removed by the Job controller")
    assert all(complete(j) for j in seen.values()), {n: j.get("status") for n, j in seen.items()}
    for job in seen.values():
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[-2:] == ["--max-jobs", str(batch)]
    wait_pods_gone(e.cluster, e.namespace, selector, T)
    logs.stop()
    stops = stop_lines(logs)
    assert len(stops) == len(logs.texts()) and set(logs.nodes.values()) == {NODE_NAME}, logs.all_text()[-4000:]
    assert sum(done for _, done, _ in stops.values()) == count, stops
    assert all(taken <= batch for taken, _, _ in stops.values()), stops
    end_pool(e, pool, tfs)
