"""Fixtures for tests that run the operator: the CRD on the real cluster, and the operator as its ServiceAccount.

Shared by tests/operator and tests/e2e (registered in tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.cluster import ApiError, LocalCluster
from harness.operator_process import CRD_FILE, Api, OperatorProcess, pool_manifest
from harness.wait import wait_for


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Remember each phase's report so fixtures can print logs when the test failed."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def call_failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


@pytest.fixture(scope="session")
def crd(k8s_cluster: LocalCluster) -> dict[str, Any]:
    """The ConsumerPool CRD applied and Established."""
    k8s_cluster.apply(CRD_FILE.read_text())
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/consumerpools.kiosk.deepcell.org"

    def established() -> Any:
        obj = k8s_cluster.get(path)
        conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
        return obj if conds.get("Established") == "True" else None

    crd_obj = wait_for(established, 60, "ConsumerPool CRD Established")
    wait_for(lambda: k8s_cluster.exists("/apis/kiosk.deepcell.org/v1alpha1"), 30, "CRD served", ignore=(ApiError,))
    return crd_obj


@pytest.fixture
def operator(
    k8s_cluster: LocalCluster, k8s_namespace: str, crd: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """`kiosk-operator --namespace NS` with exactly the RBAC of rbac_rules.yaml."""
    op = OperatorProcess(k8s_cluster, k8s_namespace, tmp_path).start()
    try:
        yield op
    finally:
        op.stop()
        if call_failed(request):
            print(f"--- operator log ({op.log_path}) ---\n{op.log()}")


@pytest.fixture
def api(k8s_cluster: LocalCluster, k8s_namespace: str) -> Api:
    """Shortcuts for pools, Deployments, pods and events in the test namespace."""
    return Api(k8s_cluster, k8s_namespace)


@pytest.fixture
def pool_yaml() -> Callable[..., str]:
    return lambda *a, **kw: yaml.safe_dump(pool_manifest(*a, **kw))
