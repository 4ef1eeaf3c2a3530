"""End-to-end fixtures for test_kubelet_player.py: model server in-process, file:// bucket, kubelet players.

The real-node e2e tests (test_real_node_e2e*.py) use harness.realnode_e2e instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import LocalCluster
from harness.kubelet import KubeletPlayer
from harness.operator_fixtures import call_failed
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
        if call_failed(request):
            print(f"--- kubelet player ({player.selector}) ---\n{player.describe()}\n{player.logs()}")
