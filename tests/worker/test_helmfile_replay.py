"""kiosk-console, replayed: each consumer release's env block against a real redis-sentinel on
port 26379, a job written as kiosk-frontend writes it, ending ``done`` with the right result.

As kiosk-console deploys them, the workers get ``REDIS_HOST`` / ``REDIS_PORT=26379`` naming a
Sentinel, and nothing else about Redis; the master listens elsewhere. The env blocks are the
test data of ``test_kiosk_console_env`` (file and commit in each header); only REDIS_HOST (the
Sentinel's host), TF_HOST/TF_PORT and STORAGE_BUCKET are replaced, REDIS_PORT stays 26379.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile
import workerkit
from test_frontend_jobs import frontend_submit, result_images, upload
from test_kiosk_console_env import helmfile_env
from test_spots import assigned_correctly, fish_image, read_polaris, recall_precision
from workerkit import mean_matched_iou

import kiosk_protocol as protocol
from harness.redis_server import LOCALHOST, RedisSentinel, RedisServer
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_model_server.mesmer_model import make_tissue
from kiosk_model_server.models import build_model
from kiosk_model_server.spot_model import make_spots
from kiosk_model_server.synthetic import make_cells, make_timelapse

SENTINEL_PORT = 26379  # kiosk-console's REDIS_PORT
Check = Callable[[dict[str, str]], None]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def console_redis() -> Iterator[tuple[RedisServer, RedisSentinel]]:
    """redis-server on a free port, a redis-sentinel monitoring it on 26379."""
    if not _port_free(SENTINEL_PORT):
        pytest.fail(f"port {SENTINEL_PORT} is taken on this machine: the kiosk-console replay needs it "
                    "for redis-sentinel", pytrace=False)
    master = RedisServer().start()
    try:
        assert master.port != SENTINEL_PORT
        sentinel = RedisSentinel(master, port=SENTINEL_PORT).start()
    except BaseException:
        master.cleanup()
        raise
    yield master, sentinel
    sentinel.cleanup()
    master.cleanup()


@pytest.fixture(scope="module")
def console_models() -> Iterator[ModelServer]:
    """Every model the five releases name, under upstream's names and versions."""
    server = ModelServer(models=[build_model("NuclearSegmentation", versions=(75,)),
                                 build_model("MultiplexSegmentation"),
                                 build_model("SpotDetection", versions=(7,)),
                                 build_model("NuclearTrackingInf", versions=(75,)),
                                 build_model("NuclearTrackingNE", versions=(75,))]).start()
    yield server
    server.stop()


def start_release(release: str, sentinel: RedisSentinel, models: ModelServer,
                  bucket: Path) -> tuple[dict[str, str], subprocess.Popen[str]]:
    env = helmfile_env(release)
    assert env["REDIS_PORT"] == str(SENTINEL_PORT) and not any(k.startswith("REDIS_SENTINEL") for k in env)
    env.update(REDIS_HOST=LOCALHOST, TF_HOST="127.0.0.1", TF_PORT=str(models.port),
               STORAGE_BUCKET=f"file://{bucket}")
    assert sentinel.port == int(env["REDIS_PORT"])
    proc = subprocess.Popen([str(workerkit.WORKER_BIN)], env={"PATH": os.environ["PATH"], **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workerkit.SPAWNED.append(proc)  # killed by conftest's reap_workers if still running
    return env, proc


def finished(client: redis.Redis, key: str, proc: subprocess.Popen[str]) -> dict[str, str]:
    def check() -> dict[str, str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        job = client.hgetall(key)
        return job if job.get("status") in protocol.FINISHED_STATUSES else None

    return wait_for(check, timeout=120, message=f"{key} finished")


def _segmentation(client: redis.Redis, queue: str, bucket: Path) -> tuple[str, Check]:
    """The segmentation form's defaults: a grayscale PNG, XYB, channels '0,'."""
    image, truth = make_cells((96, 80), 6, seed=21, touching=False)
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    key = frontend_submit(client, queue, "gray.png", upload(bucket, "gray.png", gray),
                          {"dimensionOrder": "XYB", "selectedChannels": "0,", "scale": 1})

    def check(job: dict[str, str]) -> None:
        (labels,) = result_images(job)
        assert mean_matched_iou(labels, truth) >= 0.8
    return key, check


def _caliban(client: redis.Redis, queue: str, bucket: Path) -> tuple[str, Check]:
    """The caliban form sends no dimension order, channels or scale. The movie has a division
    (cell 3 into 6 and 7 at frame 2); the release tracks through NuclearTrackingInf:75 and
    NuclearTrackingNE:75 with DIVISION 0.01 and MAX_DISTANCE 60 (checked by the test too)."""
    stack, truth, truth_lineage = make_timelapse(frames=4, shape=(96, 96), n_cells=5, seed=22)
    assert truth_lineage[3]["daughters"] == [6, 7]
    key = frontend_submit(client, queue, "movie.tif", upload(bucket, "movie.tif", stack),
                          {"dimensionOrder": "", "selectedChannels": "", "scale": ""})

    def check(job: dict[str, str]) -> None:
        with zipfile.ZipFile(job["output_url"]) as zf:
            assert sorted(zf.namelist()) == ["lineage.json", "movie_feature_0.tif"]
            labels = tifffile.imread(zf.open("movie_feature_0.tif"))
            lineage = json.loads(zf.read("lineage.json"))
        assert labels.shape == truth.shape
        assert all(mean_matched_iou(labels[t], truth[t]) >= 0.8 for t in range(len(truth)))
        # One id per true cell over the movie, and the division in the lineage.
        to_truth = {int(cid): int(np.bincount(truth[labels == int(cid)]).argmax()) for cid in lineage}
        assert sorted(to_truth.values()) == sorted(truth_lineage), to_truth
        divided = {to_truth[int(cid)]: sorted(to_truth[d] for d in info["daughters"])
                   for cid, info in lineage.items() if info["daughters"]}
        assert divided == {3: [6, 7]}, lineage
        parent = next(int(c) for c, v in to_truth.items() if v == 3)
        assert lineage[str(parent)]["frame_div"] == 2 and lineage[str(parent)]["capped"] is True
    return key, check


def _mesmer(client: redis.Redis, queue: str, bucket: Path) -> tuple[str, Check]:
    image, cells, nuclei = make_tissue((128, 128), 8, seed=23)
    key = frontend_submit(client, queue, "m.tif", upload(bucket, "m.tif", image), {"selectedChannels": "0,1"})

    def check(job: dict[str, str]) -> None:
        whole, nuclear = result_images(job)  # MESMER_COMPARTMENT both: whole-cell, then nuclear
        assert mean_matched_iou(whole, cells) >= 0.8 and mean_matched_iou(nuclear, nuclei) >= 0.8
        assert job["dim_order"] == "YXC"  # what the Kiosk's mesmer consumer writes for (X, Y, 2)
    return key, check


def _spot(client: redis.Redis, queue: str, bucket: Path) -> tuple[str, Check]:
    image, truth = make_spots((96, 96), 20, seed=24)
    key = frontend_submit(client, queue, "s.tif", upload(bucket, "s.tif", image), {})

    def check(job: dict[str, str]) -> None:
        with zipfile.ZipFile(job["output_url"]) as zf, zf.open("s_0.npy") as fh:
            coords = np.load(fh)
        recall, precision = recall_precision(coords, truth)
        assert recall >= 0.9 and precision >= 0.9, (recall, precision)
        assert job["dim_order"] == "YXC"
    return key, check


def _polaris(client: redis.Redis, queue: str, bucket: Path) -> tuple[str, Check]:
    """The polaris form: spots, nuclear and cytoplasm channels, segmentation type 'tissue'."""
    fish, truth, cells, _ = fish_image(seed=25)
    key = frontend_submit(client, queue, "fish.tif", upload(bucket, "fish.tif", fish),
                          {"dimensionOrder": "XYC", "selectedChannels": "0,1,2"})
    client.hset(key, "segmentation_type", "tissue")  # the polaris form's choice

    def check(job: dict[str, str]) -> None:
        header, rows, labels = read_polaris(job)
        assert header == ["x", "y", "cellID0"] and len(labels) == 1
        recall, precision = recall_precision(rows[:, [1, 0]], truth)
        assert recall >= 0.9 and precision >= 0.9, (recall, precision)
        assert mean_matched_iou(labels[0], cells) >= 0.8
        assert assigned_correctly(rows, rows[:, 2], labels[0], truth, cells) >= 0.9
    return key, check


RELEASES = {
    "0230.segmentation-consumer": ("segmentation", _segmentation),
    "0250.caliban-consumer": ("caliban", _caliban),
    "0260.mesmer-consumer": ("mesmer", _mesmer),
    "0270.polaris-consumer": ("polaris", _polaris),
    "0280.spot-consumer": ("spot", _spot),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_release_runs_a_frontend_job_through_the_sentinel(release, console_redis, console_models, bucket):
    master, sentinel = console_redis
    consumer_type, make_job = RELEASES[release]
    client = master.client()
    client.flushall()
    env, proc = start_release(release, sentinel, console_models, bucket)
    assert env["CONSUMER_TYPE"] == consumer_type
    key, check = make_job(client, env["QUEUE"], bucket)
    job = finished(client, key, proc)
    assert job["status"] == "done", job
    # What the frontend polls: a done status with a result URL and no failure reason.
    assert job["output_url"] and not job.get("reason"), job
    check(job)
    if consumer_type == "caliban":  # tracked through the release's models, as upstream
        called = {(name, version) for name, version, _ in console_models.predicted}
        assert {("NuclearTrackingNE", 75), ("NuclearTrackingInf", 75)} <= called, called
    # The worker found the master through the Sentinel: it registered there, and stays up.
    assert client.zscore(protocol.workers_key(env["QUEUE"]), job["updated_by"]) is not None
    assert proc.poll() is None
