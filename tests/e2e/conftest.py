"""End-to-end fixtures: the model server in-process, a file:// bucket, kubelet players cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import LocalCluster
from harness.kubelet import KubeletPlayer
from kiosk_model_server import ModelServer


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
