"""End-to-end fixtures: model server in-process, file:// bucket, kubelet players, the CRD and operator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import operator_helpers

from harness.cluster import ApiError, LocalCluster
from harness.kubelet import KubeletPlayer
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_operator.spec import GROUP, VERSION


@pytest.fixture(scope="session")
def e2e_model_server() -> Iterator[ModelServer]:
    server = ModelServer(models=["segmentation", "null"]).start()
    yield server
    server.stop()


@pytest.fixture()
def bucket(tmp_path: Path) -> Path:
    path = tmp_path / "bucket"
    path.mkdir()
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture()
def kubelet(k8s_cluster: LocalCluster, k8s_namespace: str, tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[Callable[..., KubeletPlayer]]:
    """Start KubeletPlayers for the test namespace; stopped (and their logs shown on failure) after."""
    players: list[KubeletPlayer] = []

    def start(selector: str = "", env_overrides: dict[str, str] | None = None, **kw: Any) -> KubeletPlayer:
        player = KubeletPlayer(k8s_cluster, k8s_namespace, selector, env_overrides,
                               log_dir=tmp_path / f"pods-{len(players)}", **kw).start()
        players.append(player)
        return player

    yield start
    for player in players:
        player.stop(timeout=15)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"--- kubelet player ({player.selector}) ---\n{player.describe()}\n{player.logs()}")


@pytest.fixture(scope="session")
def crd(k8s_cluster: LocalCluster) -> None:
    """The ConsumerPool CRD applied and served."""
    helpers = operator_helpers()
    k8s_cluster.apply(helpers.CRD_FILE.read_text())
    wait_for(lambda: k8s_cluster.exists(f"/apis/{GROUP}/{VERSION}"), 60, "ConsumerPool CRD served",
             ignore=(ApiError,))


@pytest.fixture()
def operator(k8s_cluster: LocalCluster, k8s_namespace: str, crd: None, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[Any]:
    """`kiosk-operator --namespace NS` as its ServiceAccount (the RBAC of rbac_rules.yaml)."""
    op = operator_helpers().OperatorProcess(k8s_cluster, k8s_namespace, tmp_path).start()
    try:
        yield op
    finally:
        op.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"--- operator log ({op.log_path}) ---\n{op.log()}")


@pytest.fixture()
def api(k8s_cluster: LocalCluster, k8s_namespace: str) -> Any:
    """Shortcuts for pools, Deployments, pods and events in the test namespace."""
    return operator_helpers().Api(k8s_cluster, k8s_namespace)
