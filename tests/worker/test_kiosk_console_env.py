"""A worker given exactly the environment kiosk-console deploys it with starts and processes a job.

The env blocks are test data (``data/kiosk-console/*.env.yaml``: file and commit in each header);
only REDIS_HOST/REDIS_PORT, TF_HOST/TF_PORT and STORAGE_BUCKET are replaced by the test's
servers. The worker runs as the ``kiosk-worker`` process with no other variable but PATH.
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import workerkit
import yaml
from test_frontend_jobs import frontend_submit
from test_spots import assigned_correctly, fish_image, read_polaris, recall_precision
from workerkit import mean_matched_iou, result_labels

import kiosk_protocol as protocol
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_model_server.mesmer_model import make_tissue
from kiosk_model_server.models import build_model
from kiosk_model_server.spot_model import make_spots

DATA = Path(__file__).parent / "data" / "kiosk-console"
REPLACED = ("REDIS_HOST", "REDIS_PORT", "TF_HOST", "TF_PORT", "STORAGE_BUCKET")


@pytest.fixture(scope="module")
def kiosk_models() -> Iterator[ModelServer]:
    """The models kiosk-console's helmfiles name: MultiplexSegmentation:9, SpotDetection:3 and :7."""
    server = ModelServer(models=[build_model("MultiplexSegmentation"),
                                 build_model("SpotDetection", versions=(7,))]).start()
    yield server
    server.stop()


def helmfile_env(release: str) -> dict[str, str]:
    data = yaml.safe_load((DATA / f"{release}.env.yaml").read_text())
    env = {**data["env"], **data["secrets"]}
    assert set(REPLACED) <= set(env)
    return {k: str(v) for k, v in env.items()}


def start(release: str, redis_server, server: ModelServer, bucket: Path) -> tuple[dict[str, str], subprocess.Popen]:
    env = helmfile_env(release)
    env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_server.port), TF_HOST="127.0.0.1",
               TF_PORT=str(server.port), STORAGE_BUCKET=f"file://{bucket}")
    proc = subprocess.Popen([str(workerkit.WORKER_BIN)], env={"PATH": os.environ["PATH"], **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workerkit.SPAWNED.append(proc)  # killed by conftest's reap_workers if still running
    return env, proc


def finished(client, key: str, proc: subprocess.Popen) -> dict[str, str]:
    def check() -> dict[str, str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        job = client.hgetall(key)
        return job if job.get("status") in protocol.FINISHED_STATUSES else None

    return wait_for(check, timeout=60, message=f"{key} finished")


def test_mesmer_release(redis_client, redis_server, kiosk_models, bucket):
    env, proc = start("0260.mesmer-consumer", redis_server, kiosk_models, bucket)
    assert env["CONSUMER_TYPE"] == "mesmer" and env["MESMER_COMPARTMENT"] == "both"
    image, cells, nuclei = make_tissue((128, 128), 8, seed=11)
    tifffile.imwrite(bucket / "m.tif", image, photometric="minisblack")
    key = frontend_submit(redis_client, env["QUEUE"], "m.tif", "m.tif", {"selectedChannels": "0,1"})
    job = finished(redis_client, key, proc)
    assert job["status"] == "done", job
    whole, nuclear = result_labels(bucket, job)  # compartment both: whole-cell, then nuclear
    assert mean_matched_iou(whole, cells) >= 0.8 and mean_matched_iou(nuclear, nuclei) >= 0.8


def test_spot_release(redis_client, redis_server, kiosk_models, bucket):
    env, proc = start("0280.spot-consumer", redis_server, kiosk_models, bucket)
    assert env["CONSUMER_TYPE"] == "spot" and env["POLARIS_MODEL"] == "SpotDetection:7"
    image, truth = make_spots((96, 96), 20, seed=12)
    tifffile.imwrite(bucket / "s.tif", image)
    key = frontend_submit(redis_client, env["QUEUE"], "s.tif", "s.tif", {})
    job = finished(redis_client, key, proc)
    assert job["status"] == "done", job
    with zipfile.ZipFile(job["output_url"]) as zf, zf.open("s_0.npy") as fh:
        coords = np.load(fh)
    recall, precision = recall_precision(coords, truth)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


def test_polaris_release(redis_client, redis_server, kiosk_models, bucket):
    env, proc = start("0270.polaris-consumer", redis_server, kiosk_models, bucket)
    assert env["CONSUMER_TYPE"] == "polaris" and env["POLARIS_MODEL"] == "SpotDetection:3"
    image, truth = make_spots((64, 64), 8, seed=13)
    tifffile.imwrite(bucket / "p.tif", np.stack([image, image], axis=-1), photometric="minisblack")
    spots_only = protocol.submit_job(redis_client, env["QUEUE"], "p.tif", channels="0,1,",
                                     segmentation_type="none")
    job = finished(redis_client, spots_only, proc)
    assert job["status"] == "done", job
    with zipfile.ZipFile(job["output_url"]) as zf:
        lines = zf.read("p_0.csv").decode().split()
    assert lines[0] == "x,y" and abs(len(lines) - 1 - len(truth)) <= 1
    # 'tissue': spots, then Mesmer on the nuclear and cytoplasm channels, spots assigned to cells.
    fish, truth, cells, _ = fish_image(seed=14)
    tifffile.imwrite(bucket / "fish.tif", fish, photometric="minisblack")
    tissue = protocol.submit_job(redis_client, env["QUEUE"], "fish.tif", channels="0,1,2",
                                 segmentation_type="tissue")
    job = finished(redis_client, tissue, proc)
    assert job["status"] == "done", job
    header, rows, labels = read_polaris(job)
    assert header == ["x", "y", "cellID0"] and len(labels) == 1
    assert mean_matched_iou(labels[0], cells) >= 0.8
    assert assigned_correctly(rows, rows[:, 2], labels[0], truth, cells) >= 0.9
    assert proc.poll() is None
