"""Operator benchmarks: depth measurement cost, reaction time, and many pools on many nodes.

* depth with 1,000,000 unrelated keys: ``measure_depth`` (registry, O(queues + workers))
  against the Kiosk autoscaler's way (SCAN MATCH over the whole keyspace for
  processing lists, then LLEN each), ms per pool.
* reaction time: items pushed into an empty queue -> worker Deployment's replicas
  patched, the operator running against the real local cluster. The baseline is the
  configured poll interval of the Kiosk autoscaler (5 s; KEDA's default is 30 s).
* 200 pools on 1,000 kwok nodes: time until every pool's Deployment is scaled after
  items land in all 200 queues, and the operator's RSS.

``ratio`` > 1 means ours is better. Run standalone: ``python -m bench.bench_operator``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import kiosk_protocol as protocol
from harness.procs import stop_process
from harness.redis_server import RedisServer
from kiosk_protocol import JobStore

REPO = Path(__file__).resolve().parents[1]

UNRELATED_KEYS = 1_000_000
KIOSK_POLL_SECONDS = 5.0
KEDA_POLL_SECONDS = 30.0


def _row(
    name: str, baseline: float, ours: float, unit: str, note: str, higher_is_better: bool = False
) -> dict:
    ratio = (ours / baseline if higher_is_better else baseline / ours) if ours and baseline else None
    return {"name": name, "baseline": baseline, "ours": ours, "unit": unit, "ratio": ratio, "note": note}


# --- depth measurement -------------------------------------------------------------------------


def _fill(client: Any, n: int) -> None:
    try:
        client.execute_command("DEBUG", "POPULATE", n, "unrelated")
        return
    except Exception:  # noqa: BLE001 - DEBUG is disabled by default since Redis 7
        pass
    chunk = 10_000
    pipe = client.pipeline(transaction=False)
    for start in range(0, n, chunk):
        pipe.mset({f"unrelated:{i}": "x" for i in range(start, min(n, start + chunk))})
        if (start // chunk) % 10 == 9:
            pipe.execute()
    pipe.execute()


def scan_tally(client: Any, queue: str) -> int:
    """The Kiosk autoscaler's way: LLEN the queue, SCAN the keyspace for its processing lists."""
    total = client.llen(queue)
    for key in client.scan_iter(match=f"{protocol.PROCESSING_PREFIX}{queue}:*", count=1000):
        total += client.llen(key)
    return total


def bench_depth(repeats: int = 5) -> list[dict]:
    server = RedisServer().start()
    try:
        client = server.client()
        _fill(client, UNRELATED_KEYS)
        queue = "segmentation"
        for i in range(50):
            protocol.submit_job(client, queue, f"img{i}.tif")
        for w in range(10):  # ten busy workers, registered
            store = JobStore(client, f"worker-{w}")
            store.pop(queue, 0)
            store.heartbeat([queue], ttl=60)
        expected = protocol.measure_depth(client, [queue]).total
        assert scan_tally(client, queue) == expected == 50
        keys = client.dbsize()

        def timed(fn: Any) -> float:
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1000)
            return statistics.median(samples)

        base = timed(lambda: scan_tally(client, queue))
        ours = timed(lambda: protocol.measure_depth(client, [queue], with_info=True))
        return [
            _row(
                "depth per pool, 1M unrelated keys",
                base,
                ours,
                "ms",
                f"SCAN tally vs worker registry; {keys:,} keys, 50 items, 10 workers; median of {repeats}",
            )
        ]
    finally:
        server.cleanup()


# --- cluster benchmarks ---------------------------------------------------------------------


def _operator(cluster: Any, ns: str, workdir: Path) -> tuple[subprocess.Popen, int]:
    from harness import rbac
    from harness.ports import free_port

    for obj in rbac.namespaced_manifests("kiosk-operator", ns):
        cluster.apply(json.dumps(obj), namespace=ns)
    kubeconfig = cluster.kubeconfig_for_serviceaccount(ns, "kiosk-operator")
    health = free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    log = open(workdir / f"operator-{ns}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiosk_operator",
            "--namespace",
            ns,
            "--metrics-port",
            "0",
            "--liveness",
            f"http://127.0.0.1:{health}/healthz",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1):
                return proc, health
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("operator did not become healthy") from None
            time.sleep(0.1)


def _pool(name: str, redis_port: int, queue: str, poll: float) -> dict:
    return {
        "apiVersion": "kiosk.deepcell.org/v1alpha1",
        "kind": "ConsumerPool",
        "metadata": {"name": name},
        "spec": {
            "queues": [queue],
            "worker": {"image": "example.invalid/kiosk-worker:bench"},
            "redis": {"host": "127.0.0.1", "port": redis_port},
            "scaling": {
                "maxWorkers": 4,
                "itemsPerWorker": 1,
                "pollingIntervalSeconds": poll,
                "cooldownSeconds": 0,
            },
        },
    }


def _replicas(cluster: Any, ns: str, name: str) -> int | None:
    from harness.cluster import ApiError

    try:
        dep = cluster.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}-worker")
    except ApiError:
        return None
    return int(dep["spec"].get("replicas") or 0)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_cluster(trials: int = 5, pools: int = 200, nodes: int = 1000) -> list[dict]:
    from harness.cluster import ApiError, LocalCluster
    from harness.wait import wait_for

    rows: list[dict] = []
    redis_server = RedisServer().start()
    client = redis_server.client()
    cluster = LocalCluster(nodes=3)
    cluster.start()
    procs: list[subprocess.Popen] = []
    try:
        cluster.apply((REPO / "crds" / "consumerpool.yaml").read_text())
        wait_for(lambda: cluster.exists("/apis/kiosk.deepcell.org/v1alpha1/consumerpools"), 60,
                 "ConsumerPool CRD served", ignore=(ApiError,))
        pools_path = "/apis/kiosk.deepcell.org/v1alpha1/namespaces/{ns}/consumerpools"
        # Reaction time.
        ns = "bench-reaction"
        cluster.create_namespace(ns)
        proc, _ = _operator(cluster, ns, Path(cluster.workdir))
        procs.append(proc)
        poll = 0.2
        cluster.request("POST", pools_path.format(ns=ns), _pool("react", redis_server.port, "react", poll))
        _wait(lambda: _replicas(cluster, ns, "react") == 0, 60)
        samples = []
        for _ in range(trials):
            t0 = time.perf_counter()
            protocol.submit_job(client, "react", "x.tif")
            _wait(lambda: (_replicas(cluster, ns, "react") or 0) > 0, 30, step=0.005)
            samples.append(time.perf_counter() - t0)
            client.delete("react")
            _wait(lambda: _replicas(cluster, ns, "react") == 0, 30)
        ours = statistics.median(samples)
        rows.append(
            _row(
                "queue items -> replicas patched",
                KIOSK_POLL_SECONDS,
                ours,
                "s",
                f"median of {trials}, pollingInterval {poll}s; baseline = Kiosk autoscaler poll 5 s "
                f"(KEDA default 30 s: ratio {KEDA_POLL_SECONDS / ours:.0f}x); max {max(samples):.2f}s",
            )
        )
        # Many pools on many nodes.
        if pools:
            cluster.create_nodes(nodes - 3, wait=True)
            ns = "bench-scale"
            cluster.create_namespace(ns)
            proc, _ = _operator(cluster, ns, Path(cluster.workdir))
            procs.append(proc)
            for i in range(pools):
                cluster.request(
                    "POST", pools_path.format(ns=ns), _pool(f"p{i}", redis_server.port, f"q{i}", 1.0)
                )
            _wait(lambda: all(_replicas(cluster, ns, f"p{i}") == 0 for i in range(pools)), 300, step=1.0)
            rss_idle = _rss_mb(proc.pid)
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for i in range(pools):
                pipe.lpush(f"q{i}", "a", "b")
            pipe.execute()
            deps = cluster.get(f"/apis/apps/v1/namespaces/{ns}/deployments")

            def all_scaled() -> bool:
                nonlocal deps
                deps = cluster.get(f"/apis/apps/v1/namespaces/{ns}/deployments")
                return sum(1 for d in deps["items"] if d["spec"].get("replicas") == 2) == pools

            _wait(all_scaled, 300, step=0.05)
            cycle = time.perf_counter() - t0
            rss = _rss_mb(proc.pid)
            rows.append(
                _row(
                    f"{pools} pools, {nodes} nodes: all scaled",
                    KIOSK_POLL_SECONDS,
                    cycle,
                    "s",
                    "items in every queue -> every Deployment patched; pollingInterval 1 s; "
                    "baseline = Kiosk poll interval",
                )
            )
            rows.append(
                {
                    "name": f"operator RSS, {pools} pools",
                    "baseline": None,
                    "ours": rss,
                    "unit": "MB",
                    "ratio": None,
                    "note": f"idle {rss_idle:.0f} MB before the burst",
                }
            )
    finally:
        for proc in procs:
            stop_process(proc, 20)
        cluster.stop()
        redis_server.cleanup()
    return rows


def _wait(pred: Any, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached in time")
        time.sleep(step)


def run() -> list[dict]:
    rows = bench_depth()
    pools = int(os.environ.get("KIOSK_BENCH_POOLS", "200"))
    rows += bench_cluster(pools=pools)
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
