"""The Kiosk stand-ins answer GetModelMetadata over real gRPC with the upstream models' signatures:
deepcell-tf's Mesmer (PanopticNet: ``input_0``, four ``semantic_*`` heads) and deepcell-spots'
SpotDetection (``input_1``; ``classification`` and ``offset_regression``), at the versions the
Kiosk asks for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiosk_model_server import ModelServer
from kiosk_model_server.models import build_model
from kiosk_worker.tfs.client import TFServingClient


@pytest.fixture(scope="module")
def client() -> Iterator[TFServingClient]:
    server = ModelServer(models=[build_model("MultiplexSegmentation"),
                                 build_model("SpotDetection", versions=(7,))]).start()
    tfs = TFServingClient("127.0.0.1", server.port, timeout=10.0, max_retries=1, backoff=0.01)
    yield tfs
    tfs.close()
    server.stop()


def shapes(part: dict) -> dict[str, tuple[str, list[int]]]:
    return {alias: (spec["dtype"], spec["shape"]) for alias, spec in part.items()}


def test_mesmer_signature(client: TFServingClient) -> None:
    meta = client.get_model_metadata("MultiplexSegmentation", 9)
    assert shapes(meta["inputs"]) == {"input_0": ("DT_FLOAT", [-1, -1, -1, 2])}
    assert shapes(meta["outputs"]) == {
        "semantic_0": ("DT_FLOAT", [-1, -1, -1, 1]), "semantic_1": ("DT_FLOAT", [-1, -1, -1, 3]),
        "semantic_2": ("DT_FLOAT", [-1, -1, -1, 1]), "semantic_3": ("DT_FLOAT", [-1, -1, -1, 3])}


@pytest.mark.parametrize("version", [3, 7])
def test_spot_detection_signature(client: TFServingClient, version: int) -> None:
    meta = client.get_model_metadata("SpotDetection", version)
    assert shapes(meta["inputs"]) == {"input_1": ("DT_FLOAT", [-1, -1, -1, 1])}
    assert shapes(meta["outputs"]) == {"classification": ("DT_FLOAT", [-1, -1, -1, 2]),
                                       "offset_regression": ("DT_FLOAT", [-1, -1, -1, 2])}
