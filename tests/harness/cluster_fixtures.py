"""Pytest fixtures for the local Kubernetes cluster.

Use from tests/conftest.py::

    from harness.cluster_fixtures import k8s_cluster, k8s_namespace  # noqa: F401
    # or: pytest_plugins = ["harness.cluster_fixtures"]

Environment:
  KIOSK_USE_RUNNING_CLUSTER=1  reuse the detached cluster from `make cluster-up`
                               (tools/cluster/cluster.py up) instead of starting one.
  KIOSK_KEEP_CLUSTER_DIR=1     keep the cluster workdir (logs) after the session.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from .cluster import LocalCluster, state_file


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[LocalCluster]:
    """A running LocalCluster with 3 fake (kwok) nodes, shared by the whole session."""
    if os.environ.get("KIOSK_USE_RUNNING_CLUSTER") and state_file().exists():
        cluster = LocalCluster.from_state()
        if not cluster.alive():
            pytest.fail(f"KIOSK_USE_RUNNING_CLUSTER set but the cluster in {state_file()} is not running")
        yield cluster
        return
    cluster = LocalCluster(nodes=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


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
