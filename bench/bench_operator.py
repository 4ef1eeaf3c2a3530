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

import collections
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
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
#: Seconds of idle operator CPU sampled after every pool settled (KIOSK_BENCH_IDLE_SECONDS).
IDLE_SAMPLE_SECONDS = float(os.environ.get("KIOSK_BENCH_IDLE_SECONDS", "5"))


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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _profiler(pid: int, out: Path, idle: bool = True) -> subprocess.Popen | None:
    """py-spy recording ``pid`` into ``out`` (collapsed stacks) while KIOSK_BENCH_PROFILE is set;
    ``idle=False`` leaves out threads that wait (where the CPU goes)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print(f"KIOSK_BENCH_PROFILE set but {spy} is missing (pip install py-spy)", file=sys.stderr)
        return None
    proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                             "--threads", *(["--idle"] if idle else []), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the burst starts
    return proc


def _api_requests(cluster: Any) -> collections.Counter:
    """kube-apiserver's counters (its /metrics): requests by verb, resource and subresource,
    ``seconds <kind>`` the time they took, ``queued <priority level>`` seconds waited in API
    Priority and Fairness queues."""
    counts: collections.Counter = collections.Counter()
    for line in str(cluster.get("/metrics")).splitlines():
        name, _, rest = line.partition("{")
        if name not in ("apiserver_request_total", "apiserver_request_duration_seconds_sum",
                        "apiserver_flowcontrol_request_wait_duration_seconds_sum"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', rest.split("}", 1)[0]))
        value = float(line.rsplit(" ", 1)[1])
        what = " ".join(x for x in (labels.get("verb"), labels.get("resource"), labels.get("subresource")) if x)
        if name == "apiserver_request_total":
            counts[what] += int(value)
        elif name == "apiserver_request_duration_seconds_sum":
            counts[f"seconds {what}"] += value
        else:
            counts[f"queued {labels.get('priority_level')}"] += value
    return counts


def _component_cpu(cluster: Any) -> dict[str, float]:
    """CPU seconds used so far by each control-plane process."""
    return {p.name: _cpu_seconds(p.pid) for p in cluster.procs if Path(f"/proc/{p.pid}").exists()}


def _burst_report(cluster: Any, api0: collections.Counter, cpu0: dict[str, float], seconds: float) -> str:
    """What the cluster did during the burst: the busiest request kinds and each component's CPU."""
    api = _api_requests(cluster) - api0
    cpu = {name: used - cpu0.get(name, 0.0) for name, used in _component_cpu(cluster).items()}
    kinds = collections.Counter({k: v for k, v in api.items() if not k.startswith(("seconds ", "queued "))})
    top = ", ".join(f"{what} {n} ({api[f'seconds {what}'] / n * 1000:.0f} ms)" for what, n in kinds.most_common(12))
    queued = ", ".join(f"{k[7:]} {v:.1f} s" for k, v in api.items() if k.startswith("queued ") and v >= 0.1)
    load = ", ".join(f"{name} {used:.1f}" for name, used in sorted(cpu.items(), key=lambda x: -x[1]))
    return (f"{sum(kinds.values())} API requests in {seconds:.2f} s: {top}\n"
            f"APF queueing: {queued or 'none'}\nCPU s: {load}")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_cluster(trials: int = 5, pools: int = 200, nodes: int = 1000, burst: bool = True) -> list[dict]:
    """Reaction time, then ``pools`` pools: idle operator CPU and RSS, and (``burst``) all scaled."""
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
            _wait(lambda: all(_replicas(cluster, ns, f"p{i}") == 0 for i in range(pools)), max(300, pools), step=1.0)
            rss_idle = _rss_mb(proc.pid)
            profile = os.environ.get("KIOSK_BENCH_PROFILE")
            if profile and not burst:
                spy = _profiler(proc.pid, Path(profile) / f"operator-idle-{pools}.txt", idle=False)
            idle_cpu0, idle_t0, redis_calls = _cpu_seconds(proc.pid), time.perf_counter(), _redis_calls(client)
            time.sleep(IDLE_SAMPLE_SECONDS)  # every pool polls its queue meanwhile
            idle_seconds = time.perf_counter() - idle_t0
            idle_cpu = (_cpu_seconds(proc.pid) - idle_cpu0) / idle_seconds
            redis_rate = (_redis_calls(client) - redis_calls) / idle_seconds
            if not burst:
                if profile and spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
                rows.append(_idle_row(pools, idle_cpu, rss_idle, redis_rate, "no burst run"))
                return rows
            spy = _profiler(proc.pid, Path(profile) / f"operator-{pools}.txt") if profile else None
            cpu0 = _cpu_seconds(proc.pid)
            api0, components0 = _api_requests(cluster), _component_cpu(cluster)
            watcher = _ScaleWatch(cluster, ns, 2)
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for i in range(pools):
                pipe.lpush(f"q{i}", "a", "b")
            pipe.execute()
            try:
                _wait(lambda: len(watcher.scaled) == pools, max(300, pools), step=0.05)
            finally:
                watcher.stop()
            patched = sorted(watcher.scaled.values())
            cycle = patched[-1] - t0
            burst_cpu = _cpu_seconds(proc.pid) - cpu0
            print(f"{pools} pools burst: {_burst_report(cluster, api0, components0, cycle)}", file=sys.stderr)
            rss = _rss_mb(proc.pid)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            median = statistics.median(patched) - t0
            rows.append(
                _row(
                    f"{pools} pools, {nodes} nodes: all scaled",
                    KIOSK_POLL_SECONDS,
                    cycle,
                    "s",
                    "items in every queue -> every Deployment patched (seen by a watch); pollingInterval 1 s; "
                    f"median pool {median:.2f} s; baseline = Kiosk poll interval; load average "
                    f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
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
            burst_note = (f"the burst took {burst_cpu:.2f} CPU s in {cycle:.2f} s "
                          f"({burst_cpu / cycle * 100:.0f}% of a core)")
            rows.append(_idle_row(pools, idle_cpu, rss_idle, redis_rate, burst_note))
    finally:
        for proc in procs:
            stop_process(proc, 20)
        cluster.stop()
        redis_server.cleanup()
    return rows


def _redis_calls(client: Any) -> int:
    """Commands the Redis server has run so far (INFO stats), to count the operator's polling."""
    return int(client.info("stats")["total_commands_processed"])


def _idle_row(pools: int, idle_cpu: float, rss_idle: float, redis_rate: float, note: str) -> dict:
    return {
        "name": f"operator CPU, {pools} pools",
        "baseline": None,
        "ours": idle_cpu * 100,
        "unit": "% of a core",
        "ratio": None,
        "note": f"idle over {IDLE_SAMPLE_SECONDS:.0f} s, every pool polling each 1 s; {rss_idle:.0f} MB RSS; "
                f"{redis_rate:.0f} Redis commands/s; {note}",
    }


class _ScaleWatch:
    """Watches a namespace's Deployments and notes when each first has ``replicas``.

    A watch costs the API server one stream; LISTing 200 Deployments every 50 ms (as this
    benchmark once did) cost it seconds of CPU during the very burst being measured.
    """

    def __init__(self, cluster: Any, ns: str, replicas: int) -> None:
        from kubernetes import client as k8s
        from kubernetes import watch

        self.scaled: dict[str, float] = {}
        self._apps = k8s.AppsV1Api(cluster.api_client())
        listed = self._apps.list_namespaced_deployment(ns)
        self._watch = watch.Watch()
        # Plain JSON (no model objects): thousands of events a second must not fall behind.
        self._stream = self._watch.stream(self._apps.list_namespaced_deployment, ns, deserialize=False,
                                          resource_version=listed.metadata.resource_version, timeout_seconds=600)
        self._replicas = replicas
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                dep = event["object"]
                if (dep.get("spec") or {}).get("replicas") == self._replicas:
                    self.scaled.setdefault(dep["metadata"]["name"], time.perf_counter())
        except Exception:  # noqa: BLE001 - stop() closes the stream under the reader
            pass

    def stop(self) -> None:
        self._watch.stop()


def _wait(pred: Any, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached in time")
        time.sleep(step)


def run() -> list[dict]:
    rows = bench_depth()
    pools = int(os.environ.get("KIOSK_BENCH_POOLS", "200"))
    nodes = int(os.environ.get("KIOSK_BENCH_NODES", "1000"))
    rows += bench_cluster(pools=pools, nodes=nodes, burst=os.environ.get("KIOSK_BENCH_IDLE_ONLY", "") == "")
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
