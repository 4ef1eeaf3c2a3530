"""Faults on the real node: a worker container SIGKILLed through the runtime mid-job, and a poison
pill (issue 11) that the kernel OOM-kills under the pool's memory limit. Nothing is simulated: ctr
kills the container's task in containerd, the cgroup's memory limit kills the decoder, the kubelet
restarts the container. The world (chart, operator pod, restricted namespace, Redis and bucket on
HOST_IP) and the helpers are those of test_real_node_e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from test_real_node_e2e import (  # helpers and fixtures only (no test is imported)
    T,
    check_results,
    communicate,
    e,  # noqa: F401 (fixture)
    end_pool,
    jobs_of,
    start_pool,
    stop_lines,
    watch_pool,  # noqa: F401 (fixture)
    write_cells,
)

import kiosk_protocol as protocol
from harness.cluster import NODE_NAME
from harness.realnode_e2e import (
    PodLogs,
    RealNodeE2E,
    kiosk_env,
    kiosk_submit,
    real_node_e2e,  # noqa: F401 (module fixture)
    sigkill_container,
    wait_pods_gone,
)
from harness.wait import wait_for
from kiosk_operator import manifests

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _worker_status(pod: dict[str, Any]) -> dict[str, Any]:
    for st in pod["status"].get("containerStatuses") or []:
        if st["name"] == manifests.WORKER_CONTAINER:
            return st
    return {}


def test_a_worker_sigkilled_mid_job_gets_its_item_back_and_it_finishes(
        e: RealNodeE2E, watch_pool: Callable[[str], PodLogs], tmp_path: Path) -> None:  # noqa: F811
    pool, queue, count = "kill", "kill-q", 4
    logs = watch_pool(pool)
    tfs = start_pool(e, pool, queue, latency_ms=3000, scaling={"maxWorkers": 1, "itemsPerWorker": 10})
    truths = write_cells(tmp_path / "images", count)
    out = tmp_path / "results"
    proc = kiosk_submit([tmp_path / "images"], queue, out, kiosk_env(e.redis, e.gcs, e.bucket), timeout=400)
    client = e.redis.client()
    selector = f"{manifests.POOL_LABEL}={pool}"

    def holding() -> tuple[dict[str, Any], str] | None:
        for pod in e.pods(selector):
            items = client.lrange(protocol.processing_key(queue, pod["metadata"]["name"]), 0, -1)
            if items and _worker_status(pod).get("state", {}).get("running"):
                return pod, items[0]
        return None

    pod, item = wait_for(holding, 240, "a worker holding its first item")
    name = pod["metadata"]["name"]
    assert not any(j.get("status") == "done" for j in jobs_of(client, queue).values())  # it is the first
    sigkill_container(e.cluster, pod, manifests.WORKER_CONTAINER)

    def restarted() -> dict[str, Any] | None:
        st = _worker_status(e.cluster.get(f"/api/v1/namespaces/{e.namespace}/pods/{name}"))
        return st if st.get("restartCount", 0) >= 1 else None

    st = wait_for(restarted, T, f"the kubelet restarted {name}'s worker container")
    killed = st["lastState"]["terminated"]
    assert killed["exitCode"] == 137 and killed["reason"] != "OOMKilled", killed
    stdout, stderr = communicate(proc, 420)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    jobs = jobs_of(client, queue)
    check_results(jobs, truths, out, set(logs.nodes))
    assert jobs[item]["attempts"] == "2", jobs[item]  # the killed take counted, then one more that finished
    assert all(j["attempts"] == "1" for k, j in jobs.items() if k != item), jobs
    wait_for(lambda: e.replicas(manifests.deployment_name(pool)) == 0, T, "pool back to 0")
    wait_pods_gone(e.cluster, e.namespace, selector, T)
    logs.stop()
    texts = logs.texts()
    assert _no_clean_stop(texts, f"{name}#0"), texts.get(f"{name}#0", "")[-3000:]  # SIGKILL: no clean exit
    stops = stop_lines(logs)
    assert sum(done for _, done, _ in stops.values()) == count, stops  # the killed instance finished none
    end_pool(e, pool, tfs)


def _no_clean_stop(texts: dict[str, str], instance: str) -> bool:
    """The instance exists and never logged its clean stop line."""
    return instance in texts and "stopped after" not in texts[instance]


def _poison_tiff(path: Path) -> None:
    """120 x 2048 x 2048 uint16 zeros, zlib: ~1 MB on disk, 960 MiB decoded: under MAX_DECODED_BYTES
    (1 GiB), far over the pool's memory limit."""
    zeros = np.zeros((2048, 2048), np.uint16)
    tifffile.imwrite(path, (zeros for _ in range(120)), shape=(120, 2048, 2048), dtype=np.uint16,
                     compression="zlib")


def test_a_poison_pill_is_oomkilled_fails_after_max_attempts_and_the_pool_drains(
        e: RealNodeE2E, watch_pool: Callable[[str], PodLogs], tmp_path: Path) -> None:  # noqa: F811
    pool, queue, good = "oom", "oom-q", 10
    logs = watch_pool(pool)
    # One worker: its pod lives until the queue is drained, so every restart of it is seen (with two,
    # a scale-down could delete a pod between an OOM kill and the next look at its restartCount).
    tfs = start_pool(e, pool, queue, scaling={"maxWorkers": 1, "itemsPerWorker": 3},
                     worker={"resources": {"requests": {"cpu": "10m", "memory": "64Mi"},
                                           "limits": {"memory": "256Mi"}}},
                     extra_env={"MAX_ATTEMPTS": "3", "MALLOC_ARENA_MAX": "2"})
    images = tmp_path / "images"
    truths = write_cells(images, good)
    _poison_tiff(images / "cells-4p-poison.tif")  # sorted among the good ones
    assert (images / "cells-4p-poison.tif").stat().st_size < 2_000_000
    out = tmp_path / "results"
    proc = kiosk_submit([images], queue, out, kiosk_env(e.redis, e.gcs, e.bucket), timeout=600)
    selector = f"{manifests.POOL_LABEL}={pool}"
    oom: dict[str, tuple[int, str]] = {}  # pod -> (restarts, last termination reason)

    def finished() -> bool:
        for pod in e.pods(selector):
            st = _worker_status(pod)
            last = (st.get("lastState") or {}).get("terminated") or {}
            if st.get("restartCount"):
                oom[pod["metadata"]["name"]] = (st["restartCount"], last.get("reason", ""))
        return proc.poll() is not None

    wait_for(finished, 620, "kiosk submit --wait to finish", max_interval=0.5)
    stdout, stderr = communicate(proc, 10)
    assert proc.returncode == 3, stdout[-3000:] + stderr[-3000:]  # exit code 3: a job failed
    assert "1 of 11 jobs failed" in stdout, stdout[-3000:]

    client = e.redis.client()
    jobs = jobs_of(client, queue)
    (poison_key,) = [k for k, j in jobs.items() if j["original_name"] == "cells-4p-poison.tif"]
    poison = jobs.pop(poison_key)
    assert poison["status"] == "failed", poison
    assert poison["reason"] == "worker died 3 times on this job", poison
    assert poison["attempts"] == "3", poison
    check_results(jobs, truths, out, set(logs.nodes))  # every other job done, correctly
    assert set(logs.nodes.values()) == {NODE_NAME}
    # One OOM kill per attempt, by the kernel at the cgroup's limit; the kubelet restarted each.
    assert sum(n for n, _ in oom.values()) == 3, oom
    assert {reason for _, reason in oom.values()} == {"OOMKilled"}, oom
    for name in logs.nodes:
        assert client.llen(protocol.processing_key(queue, name)) == 0, name
    wait_for(lambda: e.replicas(manifests.deployment_name(pool)) == 0, T, "pool back to 0")
    wait_pods_gone(e.cluster, e.namespace, selector, T)
    end_pool(e, pool, tfs)
