"""Fixtures for the TF Serving client tests: an in-process model server over real gRPC."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiosk_model_server import ModelServer
from kiosk_worker.tfs.client import TFServingClient


@pytest.fixture()
def model_server() -> Iterator[ModelServer]:
    server = ModelServer(["segmentation", "mesmer", "null", "identity"], versions=(1, 2)).start()
    yield server
    server.stop(grace=0)


@pytest.fixture()
def client(model_server: ModelServer) -> Iterator[TFServingClient]:
    tfs = TFServingClient("127.0.0.1", model_server.port, timeout=10.0, max_retries=3, backoff=0.01)
    yield tfs
    tfs.close()
