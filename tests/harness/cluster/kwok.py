"""kwok, the kubelet of the fake nodes: its Stage configuration, command line and node objects.

kwok manages the nodes annotated ``kwok.x-k8s.io/node=fake``. With the Stages in
kwok-stages.yaml, pods become Running/Ready; pods owned by a Job become Succeeded after
``job_pod_duration`` seconds (per pod: annotation ``pod-complete.stage.kwok.x-k8s.io/delay:
"5s"``), or Failed with exit code 1 if annotated ``kiosk-operator.test/pod-fail: "true"``;
pods labelled ``kiosk.deepcell.org/kubelet`` are never completed by kwok (the KubeletPlayer,
harness.kubelet, runs them as local processes and reports their outcome); deleted pods are
removed (finalizers are left to their owners, as with a real kubelet).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
POD_FAIL_ANNOTATION = "kiosk-operator.test/pod-fail"
POD_COMPLETE_DELAY_ANNOTATION = "pod-complete.stage.kwok.x-k8s.io/delay"
# Pods with this label are "run" by harness.kubelet (KubeletPlayer), which reports their
# outcome itself; kwok still makes them Running but never completes or fails them.
HARNESS_KUBELET_LABEL = "kiosk.deepcell.org/kubelet"
POD_CIDR = "10.244.0.0/16"
NODE_IP = "10.240.0.1"
STAGES_TEMPLATE = "kwok-stages.yaml"
# kwok renews each node's Lease every quarter of this. The kwok binary's own default is 0 (no
# Leases; only kwokctl passes 40): the node status heartbeat in kwok-stages.yaml is slow, so
# without Leases the node lifecycle controller would mark every node NotReady after its grace
# period.
NODE_LEASE_DURATION_SECONDS = 40
NODE_LEASE_NAMESPACE = "kube-node-lease"


def kwok_config(job_pod_duration: float, pod_delete_delay: float = 0.0) -> str:
    """The Stage documents of kwok-stages.yaml with their placeholders filled in."""
    text = resources.files(__package__).joinpath(STAGES_TEMPLATE).read_text()
    for key, value in {
        "JOB_POD_MS": str(int(job_pod_duration * 1000)),
        "POD_DELETE_MS": str(int(pod_delete_delay * 1000)),
        "POD_FAIL_ANNOTATION": POD_FAIL_ANNOTATION,
        "POD_COMPLETE_DELAY_ANNOTATION": POD_COMPLETE_DELAY_ANNOTATION,
        "HARNESS_KUBELET_LABEL": HARNESS_KUBELET_LABEL,
    }.items():
        text = text.replace("${" + key + "}", value)
    left = re.findall(r"\$\{[A-Z_]+\}", text)
    assert not left, f"{STAGES_TEMPLATE}: placeholders without a value: {left}"
    assert all(doc["kind"] == "Stage" for doc in yaml.safe_load_all(text)), f"{STAGES_TEMPLATE}: not all Stages"
    return text


def kwok_argv(binary: Path, kubeconfig: Path, config: Path) -> list[str]:
    """kwok's command line: the nodes it manages, their addresses, and node Leases (which keep
    them Ready between the slow status heartbeats)."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
        f"--cidr={POD_CIDR}",
        f"--node-ip={NODE_IP}",
        f"--node-lease-duration-seconds={NODE_LEASE_DURATION_SECONDS}",
    ]


def node_manifest(name: str, resources: Mapping[str, str], labels: Mapping[str, str] | None = None,
                  taints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A Node kwok manages, with the labels a real agent node would have."""
    node_labels = {
        "type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64", "node-role.kubernetes.io/agent": "",
        **(labels or {}),
    }
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": node_labels,
                     "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"taints": [dict(t) for t in taints]} if taints else {},
        "status": {"allocatable": dict(resources), "capacity": dict(resources), "phase": "Pending"},
    }


def nodes_ready(nodes: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> bool:
    """Whether the nodes ``names`` (default: every kwok node) are Ready and not tainted by the
    node controller, given the items of a node list."""
    by_name = {n["metadata"]["name"]: n for n in nodes}
    wanted = names if names is not None else [
        n for n, o in by_name.items() if o["metadata"].get("annotations", {}).get(KWOK_NODE_ANNOTATION) == "fake"]
    for name in wanted:
        node = by_name.get(name)
        if node is None:
            return False
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        if conds.get("Ready") != "True":
            return False
        if any(t["key"] in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
               for t in node.get("spec", {}).get("taints", []) or []):
            return False
    return True
