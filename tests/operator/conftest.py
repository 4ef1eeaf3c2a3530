"""Operator test fixtures: the CRD on the real cluster, and the operator as its ServiceAccount."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_helpers import CRD_FILE, Api, OperatorProcess, pool_manifest

from harness.cluster import ApiError, LocalCluster
from harness.wait import wait_for


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
    wait_for(
        lambda: k8s_cluster.exists("/apis/kiosk.deepcell.org/v1alpha1"), 30, "CRD served", ignore=(ApiError,)
    )
    return crd_obj


@pytest.fixture
def operator(
    k8s_cluster: LocalCluster, k8s_namespace: str, crd: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(k8s_cluster, k8s_namespace, tmp_path).start()
    try:
        yield op
    finally:
        op.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"--- operator log ({op.log_path}) ---\n{op.log()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def api(k8s_cluster: LocalCluster, k8s_namespace: str) -> Api:
    return Api(k8s_cluster, k8s_namespace)


@pytest.fixture
def pool_yaml() -> Callable[..., str]:
    return lambda *a, **kw: yaml.safe_dump(pool_manifest(*a, **kw))
