"""KEDA measured, not modelled: KEDA v2.21.0 (built from source) and our operator on the same
local cluster, the same Redis, the same worker and the same bursts, in one run.

Both sides scale the same worker pod (rendered by ``kiosk_operator.manifests`` from one pool
spec); the harness's kubelet player runs every pod as a real ``kiosk-worker`` process that pops
the Redis list, calls the model server over gRPC and writes results, so the list KEDA's redis
trigger watches really drains. Job durations vary (stand-in models that sleep 1-4 s; 1-8 s in
the stream).

* ScaledObject (redis list trigger) vs our Deployment mode, for KEDA's default polling (30 s)
  and 1 s polling, with the controller-manager's HPA sync at its default (15 s) and tuned (1 s):
  burst -> replicas patched, burst -> every item started, last item done -> zero replicas,
  replica-seconds spent idle, and workers terminated while busy (SIGTERM with an item in their
  processing list) plus items they had to give back, under a burst and under a stream.
* ScaledJob (``default`` and ``accurate`` strategies) vs our Job mode: Jobs created vs
  ceil(items / batch), the most pods Pending at once, and makespan (burst -> last item done).

Both sides get the same cooldown (KEDA ``cooldownPeriod`` = our ``cooldownSeconds``), the
same maximum and the same items-per-worker target. ``ratio`` = KEDA / ours for times and
counts (> 1: ours is better). KEDA is built by tools/keda/build.sh (``make bench``).
Sizes: BENCH_KEDA_BURST, BENCH_KEDA_STREAM_SECONDS; BENCH_KEDA_QUICK=1 runs only the two
burst cases against KEDA's 1 s polling; KIOSK_KEEP_BENCH_DIR=1 keeps the logs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import tifffile

import kiosk_protocol as protocol
from harness.cluster import HARNESS_KUBELET_LABEL, ApiError, LocalCluster
from harness.cluster.aggregation import FrontProxy
from harness.keda import Keda
from harness.kubelet import KubeletPlayer
from harness.operator_process import CRD_FILE, OperatorProcess, pool_manifest
from harness.redis_server import RedisServer
from kiosk_model_server import ModelServer
from kiosk_model_server.models import NullModel
from kiosk_operator import manifests
from kiosk_operator.spec import parse_spec

BURST = int(os.environ.get("BENCH_KEDA_BURST", "40"))
STREAM_SECONDS = float(os.environ.get("BENCH_KEDA_STREAM_SECONDS", "40"))
QUICK = os.environ.get("BENCH_KEDA_QUICK") == "1"
ITEMS_PER_WORKER = 5
MAX_WORKERS = 8
BATCH = 5
COOLDOWN = 10
GRACE = 3  # seconds a SIGTERMed worker may finish its item before giving it back
BURST_SECONDS = (1.0, 2.0, 3.0, 4.0)
STREAM_JOB_SECONDS = (1.0, 3.0, 5.0, 8.0, 2.0, 6.0)
STREAM_EVERY = 0.5
SAMPLE = 0.1
SETTLE = 3.0
HPA_DEFAULT = "15s"
HPA_TUNED = "1s"


@dataclass
class SleepModel(NullModel):
    """The null model taking ``seconds`` per call: a job of known, chosen duration."""

    seconds: float = 1.0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        return super().run(inputs)


def model_name(seconds: float) -> str:
    return f"sleep-{int(seconds * 1000)}ms"


@dataclass
class Env:
    """What every scenario shares: Redis, the model server, the bucket."""

    redis_server: RedisServer
    client: redis.Redis
    model: ModelServer
    bucket: Path
    work: Path


@contextmanager
def shared_env() -> Iterator[Env]:
    work = Path(tempfile.mkdtemp(prefix="kiosk-bench-keda-"))
    bucket = work / "bucket"
    bucket.mkdir()
    tifffile.imwrite(bucket / "tiny.tif", np.zeros((16, 16), dtype=np.float32))
    secs = sorted(set(BURST_SECONDS) | set(STREAM_JOB_SECONDS))
    model = ModelServer(models=[SleepModel(model_name(s), (1,), seconds=s) for s in secs], max_workers=64).start()
    server = RedisServer().start()
    try:
        yield Env(server, server.client(), model, bucket, work)
    finally:
        model.stop()
        server.cleanup()
        if not os.environ.get("KIOSK_KEEP_BENCH_DIR"):  # pod, KEDA and operator logs live here
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def cluster_with_keda(env: Env, hpa_sync: str) -> Iterator[tuple[LocalCluster, Keda]]:
    """A fresh cluster (aggregation layer on, HPA sync period ``hpa_sync``) with KEDA and our CRD."""
    fp = FrontProxy(env.work / f"front-proxy-{hpa_sync}").write()
    cluster = LocalCluster(nodes=3, extra_apiserver_args=fp.apiserver_args(),
                           extra_controller_manager_args=[f"--horizontal-pod-autoscaler-sync-period={hpa_sync}"])
    cluster.start()
    keda = None
    try:
        cluster.apply(CRD_FILE.read_text())
        keda = Keda(cluster, env.work / f"keda-{hpa_sync}").start()
        _wait(lambda: cluster.exists("/apis/kiosk.deepcell.org/v1alpha1/consumerpools"), 60, "ConsumerPool CRD")
        yield cluster, keda
    finally:
        if keda is not None:
            keda.stop()
        cluster.stop()


# --- the worker pod both sides run ----------------------------------------------------------------


def pool_spec(env: Env, name: str, queue: str, **scaling: Any) -> dict[str, Any]:
    """One ConsumerPool; KEDA's Deployment / Job template is rendered from the same spec."""
    return pool_manifest(
        name, env.redis_server.port, queues=[queue],
        worker={
            "podLabels": {HARNESS_KUBELET_LABEL: "bench"},
            "graceSeconds": GRACE, "terminationGracePeriodSeconds": GRACE + 2,
            "heartbeatIntervalSeconds": 0.5,
            "env": [{"name": "EMPTY_QUEUE_TIMEOUT", "value": "1"}, {"name": "LOG_LEVEL", "value": "INFO"},
                    {"name": "MAX_RETRY", "value": "2"}],
        },
        modelServer={"host": "127.0.0.1", "port": env.model.port},
        storage={"bucket": f"file://{env.bucket}"},
        scaling={"minWorkers": 0, "maxWorkers": MAX_WORKERS, "itemsPerWorker": ITEMS_PER_WORKER,
                 "cooldownSeconds": COOLDOWN, "batchSize": BATCH, **scaling},
    )


def _redis_trigger(env: Env, queue: str, target: int) -> dict[str, Any]:
    return {"type": "redis", "metadata": {"address": f"127.0.0.1:{env.redis_server.port}", "listName": queue,
                                          "listLength": str(target), "activationListLength": "0"}}


def keda_scaled_object(env: Env, cluster: LocalCluster, ns: str, pool: str, queue: str, polling: int | None) -> str:
    """Our worker Deployment at 0 replicas plus a ScaledObject on it; returns the Deployment's name."""
    spec = pool_spec(env, pool, queue)["spec"]
    dep = manifests.build_deployment(pool, ns, parse_spec(spec), 0)
    cluster.apply(dep)
    so: dict[str, Any] = {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": pool, "namespace": ns},
        "spec": {"scaleTargetRef": {"name": dep["metadata"]["name"]}, "cooldownPeriod": COOLDOWN,
                 "minReplicaCount": 0, "maxReplicaCount": MAX_WORKERS,
                 "triggers": [_redis_trigger(env, queue, ITEMS_PER_WORKER)]},
    }
    if polling is not None:
        so["spec"]["pollingInterval"] = polling
    cluster.apply(so)
    _wait(lambda: _ready(cluster.get(f"/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects/{pool}")), 60,
          "ScaledObject Ready")
    return dep["metadata"]["name"]


def keda_scaled_job(env: Env, cluster: LocalCluster, ns: str, pool: str, queue: str, strategy: str,
                    polling: int | None) -> None:
    """A ScaledJob whose Job template is our batch worker Job's (takes up to BATCH items, exits)."""
    spec = pool_spec(env, pool, queue, mode="Job")["spec"]
    job = manifests.build_job(pool, ns, parse_spec(spec), 0)
    sj: dict[str, Any] = {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob",
        "metadata": {"name": pool, "namespace": ns},
        "spec": {"jobTargetRef": {k: job["spec"][k] for k in ("backoffLimit", "completions", "parallelism",
                                                               "template")},
                 "maxReplicaCount": MAX_WORKERS, "scalingStrategy": {"strategy": strategy},
                 "successfulJobsHistoryLimit": 100, "failedJobsHistoryLimit": 100,
                 "triggers": [_redis_trigger(env, queue, BATCH)]},
    }
    if polling is not None:
        sj["spec"]["pollingInterval"] = polling
    cluster.apply(sj)
    _wait(lambda: _ready(cluster.get(f"/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledjobs/{pool}")), 60,
          "ScaledJob Ready")


def settle() -> None:
    """Let a new scaler's first poll pass before the burst (KEDA polls once when a ScaledObject or
    ScaledJob becomes Ready): the burst then lands SETTLE seconds into a polling interval, for
    KEDA's 30 s default close to the worst case (the mean over burst times would be ~half)."""
    time.sleep(SETTLE)


def _ready(obj: dict[str, Any]) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Trace:
    """What one scenario run saw, sampled every SAMPLE seconds from the first item submitted."""

    keys: list[str] = field(default_factory=list)
    t_patched: float | None = None
    t_all_started: float | None = None
    t_all_done: float | None = None
    t_zero: float | None = None
    replica_seconds: float = 0.0
    idle_seconds: float = 0.0
    busy_terminated: int = 0
    given_back: int = 0
    jobs_created: int = 0
    max_pending_pods: int = 0
    failed: int = 0


def submit(env: Env, queue: str, seconds: float) -> str:
    key = protocol.job_key(queue, "tiny.tif")
    pipe = env.client.pipeline(transaction=False)
    pipe.hset(key, mapping=protocol.submission_fields("tiny.tif", model_name(seconds), "1"))
    pipe.lpush(queue, key)
    pipe.execute()
    return key


def measure(env: Env, cluster: LocalCluster, ns: str, queue: str, player: KubeletPlayer, *,
            arrivals: list[tuple[float, float]], replicas: Callable[[], int] | None, timeout: float = 400) -> Trace:
    """Submit ``arrivals`` ((offset s, job seconds)) and sample until every item is done and the
    pool is back at zero (replicas 0, or no unfinished Job when ``replicas`` is None; and no
    worker process left)."""
    tr = Trace()
    started: set[str] = set()
    busy_seen: set[str] = set()
    seen_jobs: set[str] = set()
    t0 = time.monotonic()
    last = t0
    pending = list(arrivals)
    deadline = t0 + timeout
    while True:
        now = time.monotonic()
        el = now - t0
        while pending and pending[0][0] <= el:
            tr.keys.append(submit(env, queue, pending.pop(0)[1]))
        procs = list(player.processes.values())
        live = [p for p in procs if p.running and not p.terminating]
        pipe = env.client.pipeline(transaction=False)
        for key in tr.keys:
            pipe.hget(key, "status")
        for p in procs:
            pipe.llen(protocol.processing_key(queue, p.pod))
        res = pipe.execute()
        statuses, held = res[:len(tr.keys)], dict(zip([p.pod for p in procs], res[len(tr.keys):], strict=True))
        started.update(k for k, s in zip(tr.keys, statuses, strict=True) if s and s != protocol.NEW)
        done = sum(1 for s in statuses if s in protocol.FINISHED_STATUSES)
        for p in procs:  # SIGTERM sent while the worker held an item
            if p.terminating and p.pod not in busy_seen:
                busy_seen.add(p.pod)
                tr.busy_terminated += bool(held[p.pod])
        dt = now - last
        last = now
        busy = sum(1 for p in live if held[p.pod])
        tr.replica_seconds += len(live) * dt
        tr.idle_seconds += (len(live) - busy) * dt
        if replicas is not None:
            want = replicas()
        else:
            jobs = cluster.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
            seen_jobs.update(j["metadata"]["name"] for j in jobs)
            want = sum(1 for j in jobs if not j.get("status", {}).get("completionTime")
                       and not any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                                   for c in (j.get("status") or {}).get("conditions") or []))
            pods = cluster.get(f"/api/v1/namespaces/{ns}/pods")["items"]
            tr.max_pending_pods = max(tr.max_pending_pods,
                                      sum(1 for p in pods if p.get("status", {}).get("phase") == "Pending"))
        if tr.t_patched is None and (want > 0 or seen_jobs):
            tr.t_patched = el
        if not pending and tr.t_all_started is None and len(started) == len(tr.keys):
            tr.t_all_started = el
        if not pending and tr.t_all_done is None and done == len(tr.keys):
            tr.t_all_done = el
        if tr.t_all_done is not None and want == 0 and not any(p.running for p in procs):
            tr.t_zero = el - tr.t_all_done
            break
        if now > deadline:
            raise TimeoutError(f"{ns}: not back at zero after {timeout}s: {done}/{len(tr.keys)} done, "
                               f"{len(started)} started, replicas {want}\n{player.describe()}")
        time.sleep(SAMPLE)
    tr.jobs_created = len(seen_jobs)
    logs = player.logs(tail=200_000)
    tr.given_back = logs.count("grace period of")
    statuses = [env.client.hget(k, "status") for k in tr.keys]
    tr.failed = sum(1 for s in statuses if s != protocol.DONE)
    summary = {k: round(v, 2) if isinstance(v, float) else v for k, v in vars(tr).items() if k != "keys"}
    print(f"   [bench_keda] {ns}: {len(tr.keys)} items {summary}", file=sys.stderr, flush=True)
    return tr


def _deployment_replicas(cluster: LocalCluster, ns: str, name: str) -> Callable[[], int]:
    def get() -> int:
        try:
            return int(cluster.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")["spec"].get("replicas") or 0)
        except ApiError:
            return 0
    return get


def burst_arrivals() -> list[tuple[float, float]]:
    return [(0.0, BURST_SECONDS[i % len(BURST_SECONDS)]) for i in range(BURST)]


def stream_arrivals() -> list[tuple[float, float]]:
    n = int(STREAM_SECONDS / STREAM_EVERY)
    return [(i * STREAM_EVERY, STREAM_JOB_SECONDS[i % len(STREAM_JOB_SECONDS)]) for i in range(n)]


_seq = 0


def _scenario(env: Env, cluster: LocalCluster, label: str) -> tuple[str, str, str, KubeletPlayer]:
    """A fresh namespace, queue and pool name, and a kubelet player for the pool's pods."""
    global _seq
    _seq += 1
    ns = cluster.create_namespace(f"b{_seq}-{label}")
    pool, queue = f"p{_seq}", f"q{_seq}"
    player = KubeletPlayer(cluster, ns, f"{manifests.POOL_LABEL}={pool}",
                           log_dir=env.work / "pods" / ns).start()
    return ns, pool, queue, player


def run_ours(env: Env, cluster: LocalCluster, kind: str, arrivals: list[tuple[float, float]]) -> Trace:
    ns, pool, queue, player = _scenario(env, cluster, f"ours-{kind}")
    op = OperatorProcess(cluster, ns, env.work).start()
    try:
        mode = {"mode": "Job"} if kind == "job" else {}
        cluster.request("POST", f"/apis/kiosk.deepcell.org/v1alpha1/namespaces/{ns}/consumerpools",
                        pool_spec(env, pool, queue, **mode))
        if kind == "job":
            _wait(lambda: _pool_measured(cluster, ns, pool), 60, "pool measured")
            settle()
            return measure(env, cluster, ns, queue, player, arrivals=arrivals, replicas=None)
        get = _deployment_replicas(cluster, ns, manifests.deployment_name(pool))
        _wait(lambda: cluster.exists(f"/apis/apps/v1/namespaces/{ns}/deployments/{manifests.deployment_name(pool)}"),
              60, "our worker Deployment")
        settle()
        return measure(env, cluster, ns, queue, player, arrivals=arrivals, replicas=get)
    finally:
        player.stop(timeout=15)
        op.stop()
        cluster.delete_namespace(ns)


def _pool_measured(cluster: LocalCluster, ns: str, pool: str) -> bool:
    st = cluster.get(f"/apis/kiosk.deepcell.org/v1alpha1/namespaces/{ns}/consumerpools/{pool}").get("status", {})
    return any(c["type"] == "RedisReachable" and c["status"] == "True" for c in st.get("conditions", []))


def run_keda_so(env: Env, cluster: LocalCluster, polling: int | None, arrivals: list[tuple[float, float]]) -> Trace:
    ns, pool, queue, player = _scenario(env, cluster, "keda-so")
    try:
        dep = keda_scaled_object(env, cluster, ns, pool, queue, polling)
        settle()
        return measure(env, cluster, ns, queue, player, arrivals=arrivals,
                       replicas=_deployment_replicas(cluster, ns, dep))
    finally:
        player.stop(timeout=15)
        cluster.delete_namespace(ns)


def run_keda_sj(env: Env, cluster: LocalCluster, strategy: str, polling: int | None,
                arrivals: list[tuple[float, float]]) -> Trace:
    ns, pool, queue, player = _scenario(env, cluster, f"keda-sj-{strategy}")
    try:
        keda_scaled_job(env, cluster, ns, pool, queue, strategy, polling)
        settle()
        return measure(env, cluster, ns, queue, player, arrivals=arrivals, replicas=None)
    finally:
        player.stop(timeout=15)
        cluster.delete_namespace(ns)


# --- rows -----------------------------------------------------------------------------------------


def _row(name: str, keda: float | None, ours: float | None, unit: str, note: str) -> dict:
    ratio = None
    if keda is not None and ours is not None:
        ratio = round(keda / ours, 2) if ours else (math.inf if keda else 1.0)
    return {"name": name, "baseline": None if keda is None else round(keda, 2),
            "ours": None if ours is None else round(ours, 2), "unit": unit, "ratio": ratio,
            "note": f"baseline = KEDA v2.21.0 measured; {note}"}


def so_rows(case: str, label: str, keda: Trace, ours: Trace) -> list[dict]:
    n = len(ours.keys)
    return [
        _row(f"{case}: items -> replicas patched ({label})", keda.t_patched, ours.t_patched, "s",
             f"{n} items, Deployment at 0"),
        _row(f"{case}: items -> every item started ({label})", keda.t_all_started, ours.t_all_started, "s",
             f"max {MAX_WORKERS} workers, {ITEMS_PER_WORKER} items/worker"),
        _row(f"{case}: last item done -> zero replicas ({label})", keda.t_zero, ours.t_zero, "s",
             f"cooldown {COOLDOWN} s on both"),
        _row(f"{case}: replica-seconds idle ({label})", keda.idle_seconds, ours.idle_seconds, "worker-s",
             f"of {keda.replica_seconds:.0f} vs {ours.replica_seconds:.0f} replica-s in all"),
        _row(f"{case}: busy workers terminated ({label})", keda.busy_terminated, ours.busy_terminated, "workers",
             f"SIGTERM with an item held; items given back after the {GRACE} s grace: "
             f"KEDA {keda.given_back}, ours {ours.given_back}; not done: KEDA {keda.failed}, ours {ours.failed}"),
    ]


def sj_rows(case: str, label: str, keda: Trace, ours: Trace) -> list[dict]:
    n = len(ours.keys)
    need = math.ceil(n / BATCH)
    return [
        _row(f"{case}: Jobs created ({label})", keda.jobs_created, ours.jobs_created, "Jobs",
             f"needed ceil({n}/{BATCH}) = {need}; max {MAX_WORKERS} at once"),
        _row(f"{case}: most pods Pending at once ({label})", keda.max_pending_pods, ours.max_pending_pods, "pods",
             "sampled every 0.1 s"),
        _row(f"{case}: makespan ({label})", keda.t_all_done, ours.t_all_done, "s",
             f"first item submitted -> last item done; not done: KEDA {keda.failed}, ours {ours.failed}"),
    ]


def run() -> list[dict]:
    rows: list[dict] = []
    with shared_env() as env:
        burst, stream = burst_arrivals(), stream_arrivals()
        with cluster_with_keda(env, HPA_TUNED if QUICK else HPA_DEFAULT) as (cluster, _keda):
            ours_burst = run_ours(env, cluster, "deploy", burst)
            ours_jobs = run_ours(env, cluster, "job", burst)
            if QUICK:
                keda_so = run_keda_so(env, cluster, 1, burst)
                rows += so_rows("ScaledObject burst", "KEDA poll 1 s, HPA sync 1 s", keda_so, ours_burst)
                keda_sj = run_keda_sj(env, cluster, "default", 1, burst)
                rows += sj_rows("ScaledJob burst", "default, poll 1 s", keda_sj, ours_jobs)
                return rows
            ours_stream = run_ours(env, cluster, "deploy", stream)
            for polling, label in ((None, "KEDA poll 30 s (default)"), (1, "KEDA poll 1 s")):
                lab = f"{label}, HPA sync 15 s"
                rows += so_rows("ScaledObject burst", lab, run_keda_so(env, cluster, polling, burst), ours_burst)
                rows += so_rows("ScaledObject stream", lab, run_keda_so(env, cluster, polling, stream), ours_stream)
            for strategy in ("default", "accurate"):
                for polling, label in ((None, "poll 30 s"), (1, "poll 1 s")):
                    rows += sj_rows("ScaledJob burst", f"{strategy}, {label}",
                                    run_keda_sj(env, cluster, strategy, polling, burst), ours_jobs)
        with cluster_with_keda(env, HPA_TUNED) as (cluster, _keda):
            lab = "KEDA poll 1 s, HPA sync 1 s"
            rows += so_rows("ScaledObject burst", lab, run_keda_so(env, cluster, 1, burst), ours_burst)
            rows += so_rows("ScaledObject stream", lab, run_keda_so(env, cluster, 1, stream), ours_stream)
    return rows


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except ApiError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark: {what} not reached in {timeout}s")
        time.sleep(0.1)


if __name__ == "__main__":
    for r in run():
        print(json.dumps(r))
    sys.exit(0)
