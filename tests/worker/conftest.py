"""Fixtures for worker tests: a real model server over gRPC, a file:// bucket.

Helper functions (worker_env, settings_for, run_batch, submit, ...) live in
``workerkit.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import workerkit

from kiosk_model_server import ModelServer


@pytest.fixture(scope="session")
def model_server() -> Iterator[ModelServer]:
    """segmentation + null models, any input size."""
    server = ModelServer(models=["segmentation", "null"], versions=(1, 2)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiled_model_server() -> Iterator[ModelServer]:
    """segmentation with a fixed 64x64 input: the worker must tile and stitch."""
    server = ModelServer(models=["segmentation"], tile=64).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def reap_workers() -> Iterator[None]:
    """No worker process a test spawned outlives it: a stray worker blocked on a shared
    queue would take a later test's jobs (the db is flushed per test, processes are not)."""
    yield
    workerkit.reap_workers()


@pytest.fixture()
def bucket(tmp_path: Path) -> Path:
    path = tmp_path / "bucket"
    path.mkdir()
    return path


