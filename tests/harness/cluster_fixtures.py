"""Pytest fixtures for the local Kubernetes cluster.

Use from tests/conftest.py::

    from harness.cluster_fixtures import k8s_cluster, k8s_namespace  # noqa: F401
    # or: pytest_plugins = ["harness.cluster_fixtures"]

Environment:
  KIOSK_USE_RUNNING_CLUSTER=1  reuse the detached cluster from `make cluster-up`
                               (tools/cluster/cluster.py up) instead of starting one.
  KIOSK_KEEP_CLUSTER_DIR=1     keep the cluster workdir (logs) after the session.

``real_node_cluster`` is the same session cluster with the real kubelet + containerd node
(harness.cluster.realnode) attached for the modules that use it: the API server of
``k8s_cluster`` is always started able to take it, and sessions that never ask pay nothing. Pods meant for the
real node carry ``realnode.TOLERATION`` and ``realnode.NODE_SELECTOR``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from .cluster import LocalCluster, state_file
from .cluster.netns import NodeUnsupported
from .cluster.realnode import RealNode


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[LocalCluster]:
    """A running LocalCluster with 3 fake (kwok) nodes, shared by the whole session (its API server
    can take the real node: see real_node_cluster)."""
    if os.environ.get("KIOSK_USE_RUNNING_CLUSTER") and state_file().exists():
        cluster = LocalCluster.from_state()
        if not cluster.alive():
            pytest.fail(f"KIOSK_USE_RUNNING_CLUSTER set but the cluster in {state_file()} is not running")
        yield cluster
        return
    cluster = LocalCluster(nodes=3, real_node_capable=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def _real_node_module(k8s_cluster: LocalCluster) -> Iterator[None]:
    """At the end of a module that used the real node, stop it (and delete its Node) unless it was
    there before: tests elsewhere in the session see only the kwok nodes, whatever the order."""
    had_node = k8s_cluster.real_node is not None
    yield
    node: RealNode | None = k8s_cluster.real_node
    if node is not None and not had_node:
        k8s_cluster.stop_real_node()


@pytest.fixture
def real_node_cluster(k8s_cluster: LocalCluster, _real_node_module: None) -> LocalCluster:
    """The session cluster with the real node attached (started on a module's first use, ~3 s,
    stopped at the module's end; a test that stops it, e.g. to check teardown, gets it restarted
    for the next one)."""
    if k8s_cluster.real_node is None and not k8s_cluster.real_node_capable:
        pytest.fail("the running cluster cannot take a real node: start it with a real node "
                    "(LocalCluster(real_node=True)) or unset KIOSK_USE_RUNNING_CLUSTER")
    try:
        k8s_cluster.start_real_node()
    except NodeUnsupported as exc:  # one line naming what this machine lacks; never a skip
        pytest.fail(str(exc), pytrace=False)
    return k8s_cluster


@pytest.fixture
def k8s_namespace(k8s_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (default ServiceAccount ready) named after the test; deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "t"
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    k8s_cluster.create_namespace(name, labels={"kiosk-operator.test/namespace": "true"})
    try:
        yield name
    finally:
        k8s_cluster.delete_namespace(name)
