"""kwok's nodes stay Ready because kwok renews their node Leases.

kwok-stages.yaml sends a node status heartbeat only every ~10 minutes, so the node lifecycle
controller relies on each node's Lease in kube-node-lease. Without Leases every node went
NotReady about every 55 s ("Entering master disruption mode") and the pods on them Ready=False;
this test watches nodes, Leases and a Deployment's pods for several grace periods.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from harness.cluster import LocalCluster
from harness.cluster.kwok import KWOK_NODE_ANNOTATION, NODE_LEASE_DURATION_SECONDS, NODE_LEASE_NAMESPACE
from harness.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Longer than three node-monitor grace periods (the default 50 s) plus the monitor period:
# without Leases the nodes went NotReady within the first minute.
WINDOW = 180.0
REPLICAS = 3
# The Lease is renewed every quarter of its duration (10 s); a third of the nominal count
# leaves room for a busy machine and still fails if renewals stop.
MIN_RENEWALS = int(WINDOW / (NODE_LEASE_DURATION_SECONDS / 4) / 3)


def _kwok_nodes(c: LocalCluster) -> list[dict[str, Any]]:
    return [n for n in c.get("/api/v1/nodes")["items"]
            if n["metadata"].get("annotations", {}).get(KWOK_NODE_ANNOTATION) == "fake"]


def _not_ready(node: dict[str, Any]) -> str | None:
    """Why the node is not Ready (None if it is), from its conditions and taints."""
    conds = {c["type"]: c for c in node.get("status", {}).get("conditions", [])}
    ready = conds.get("Ready", {})
    if ready.get("status") != "True":
        return f"Ready={ready.get('status')} ({ready.get('reason')}: {ready.get('message')})"
    taints = [t["key"] for t in node.get("spec", {}).get("taints", []) or []
              if t["key"] in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")]
    return f"tainted {taints}" if taints else None


def test_kwok_nodes_and_their_pods_stay_ready_with_renewed_leases(k8s_cluster: LocalCluster,
                                                                   k8s_namespace: str) -> None:
    c, ns = k8s_cluster, k8s_namespace
    names = sorted(n["metadata"]["name"] for n in _kwok_nodes(c))
    assert len(names) >= 3
    c.apply(json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "steady"},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": "steady"}},
                 "template": {"metadata": {"labels": {"app": "steady"}},
                              "spec": {"containers": [{"name": "main", "image": "example.invalid/app:1"}]}}},
    }), namespace=ns)

    def ready_pods() -> int:
        pods = c.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="app=steady")["items"]
        return sum(1 for p in pods if p["status"].get("phase") == "Running" and any(
            x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", [])))

    wait_for(lambda: ready_pods() == REPLICAS, 60, f"{REPLICAS} Ready pods of Deployment steady")

    renewals: dict[str, set[str]] = {name: set() for name in names}
    start = time.monotonic()

    def observe() -> bool:
        """One look at nodes, Leases and pods; fails at the first lapse, True once the window is over."""
        nodes = {n["metadata"]["name"]: n for n in _kwok_nodes(c)}
        leases = {x["metadata"]["name"]: x for x in
                  c.get(f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases")["items"]}
        elapsed = time.monotonic() - start
        for name in names:
            why = _not_ready(nodes[name])
            assert why is None, f"node {name} not Ready after {elapsed:.0f}s: {why}"
            lease = leases.get(name)
            assert lease is not None, f"no Lease {NODE_LEASE_NAMESPACE}/{name} after {elapsed:.0f}s"
            spec = lease["spec"]
            assert spec.get("holderIdentity") and spec.get("leaseDurationSeconds") == NODE_LEASE_DURATION_SECONDS, spec
            renewals[name].add(spec["renewTime"])
        ready = ready_pods()
        assert ready == REPLICAS, f"{ready}/{REPLICAS} pods Ready after {elapsed:.0f}s"
        return elapsed >= WINDOW

    wait_for(observe, WINDOW + 60, f"{WINDOW:.0f}s of Ready nodes", interval=1.0, max_interval=2.0)
    counts = {name: len(times) for name, times in renewals.items()}
    assert all(n >= MIN_RENEWALS for n in counts.values()), f"Lease renewals seen per node: {counts}"
