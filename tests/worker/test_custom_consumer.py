"""The custom-consumer example package: installed through pip, found through its entry
point, run end to end by the real ``kiosk-worker`` command (CONSUMER_TYPE=thresholder)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile

import kiosk_protocol as protocol
from harness.redis_server import RedisServer
from kiosk_model_server.synthetic import make_cells
from kiosk_worker.consumers import available, get_consumer_class

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom-consumer"
WORKER_BIN = Path(sys.executable).with_name("kiosk-worker")


def _registered() -> bool:
    return any(ep.name == "thresholder" for ep in metadata.entry_points(group="kiosk_worker.consumers"))


@pytest.fixture(scope="session")
def example_installed() -> None:
    """`make test` installs the example up front; install it here if it is missing."""
    if not _registered():
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "-e", str(EXAMPLE)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        importlib.invalidate_caches()
        # New processes pick the package up from its .pth file; this one needs the path now.
        try:
            importlib.import_module("kiosk_example_consumer")
        except ImportError:
            sys.path.insert(0, str(EXAMPLE / "src"))
    assert _registered(), "the example's entry point is not visible after installing it"


def test_entry_point_registers_the_consumer(example_installed: None) -> None:
    from kiosk_worker.consumers.base import Consumer

    cls = get_consumer_class("thresholder")
    assert cls.__name__ == "ThresholdConsumer" and issubclass(cls, Consumer)
    assert get_consumer_class("THRESHOLDER") is cls
    assert "thresholder" in available()


def test_threshold_labels_pure(example_installed: None) -> None:
    from kiosk_example_consumer import threshold_labels

    image = np.zeros((20, 20))
    image[2:6, 2:6] = 1.0
    image[10:15, 10:18] = 0.8
    labels = threshold_labels(image)
    assert labels.max() == 2 and (labels[2:6, 2:6] > 0).all() and labels[0, 0] == 0
    assert threshold_labels(image, level=0.9).max() == 1
    assert threshold_labels(np.zeros((5, 5))).max() == 0


def test_thresholder_job_end_to_end(example_installed: None, redis_server: RedisServer,
                                    redis_client: redis.Redis, tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    image, truth = make_cells((64, 64), n_cells=6, seed=2, touching=False)
    tifffile.imwrite(bucket / "cells.tif", image)
    (bucket / "empty.tif").write_bytes(b"")
    good = protocol.submit_job(redis_client, "threshold", "cells.tif")
    bad = protocol.submit_job(redis_client, "threshold", "empty.tif")
    env = {**os.environ, **redis_server.env(), "STORAGE_BUCKET": f"file://{bucket}",
           "QUEUE": "threshold", "CONSUMER_TYPE": "thresholder", "WORKER_NAME": "thresholder-1",
           "EMPTY_QUEUE_TIMEOUT": "0.3"}
    proc = subprocess.run([str(WORKER_BIN), "--max-jobs", "5"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

    job = redis_client.hgetall(good)
    assert job["status"] == "done", job.get("reason")
    assert job["updated_by"] == "thresholder-1" and job["identity_started"] == "thresholder-1"
    assert job["upload_time"] and job["download_time"] and job["finished_at"]
    with zipfile.ZipFile(job["output_url"]) as zf:
        [name] = zf.namelist()
        with zf.open(name) as fh:
            labels = tifffile.imread(fh)
    assert labels.shape == truth.shape
    assert labels.max() == truth.max()  # separate cells -> one component each
    fg_agreement = ((labels > 0) == (truth > 0)).mean()
    assert fg_agreement > 0.95

    failed = redis_client.hgetall(bad)
    assert failed["status"] == "failed" and "empty" in failed["reason"]
    assert "\n" not in failed["reason"]
