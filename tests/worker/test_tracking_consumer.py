"""Tracking jobs end to end: time-lapse TIFF -> model server (gRPC) per frame -> deep
watershed -> the Kiosk's model-driven tracking (neighborhood encoder and tracking inference
model over gRPC, upstream's assignment) -> zip with the tracked stack and lineage.json, checked
against the synthetic ground truth (ids consistent over frames, divisions found)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile

import kiosk_protocol as protocol
from harness.redis_server import RedisServer
from kiosk_model_server.models import build_model
from kiosk_model_server.server import ModelServer
from kiosk_model_server.synthetic import make_timelapse
from kiosk_protocol.settings import load_settings
from kiosk_worker.consumers.tracking import movie_order
from kiosk_worker.errors import BadImage
from kiosk_worker.runner import Runner

QUEUE = "track"


def tracking_server(tile: int | None = None) -> ModelServer:
    """The segmentation stand-in (as 'segmentation') and both tracking models under the Kiosk's
    default names and versions (NuclearTrackingInf:6, NuclearTrackingNE:6)."""
    return ModelServer(models=[build_model("segmentation", versions=(1,), tile=tile),
                               build_model("NuclearTrackingInf"), build_model("NuclearTrackingNE")]).start()


@pytest.fixture(scope="module")
def tracking_models() -> Iterator[ModelServer]:
    server = tracking_server()
    yield server
    server.stop()


def run_worker(redis_server: RedisServer, server: ModelServer, bucket: Path, consumer: str = "tracking",
               **extra: str) -> Runner:
    env = {
        **redis_server.env(), "TF_HOST": "127.0.0.1", "TF_PORT": str(server.port),
        "STORAGE_BUCKET": f"file://{bucket}", "QUEUE": QUEUE, "CONSUMER_TYPE": consumer,
        "EMPTY_QUEUE_TIMEOUT": "0.2", "HEARTBEAT_INTERVAL": "0.2", "GRPC_BACKOFF": "0.01",
        "MAX_RETRY": "1", "WORKER_NAME": "tracker", **extra,
    }
    runner = Runner(load_settings(env), max_jobs=100)
    assert runner.run() == 0
    return runner


def submit_movie(client: redis.Redis, bucket: Path, name: str, stack: np.ndarray, **extra: str) -> str:
    tifffile.imwrite(bucket / name, stack, photometric="minisblack")
    return protocol.submit_job(client, QUEUE, name, "segmentation", "1", **extra)


def read_result(job: dict[str, str]) -> tuple[np.ndarray, dict[str, dict]]:
    with zipfile.ZipFile(job["output_url"]) as zf:
        names = sorted(zf.namelist())
        assert len(names) == 2 and "lineage.json" in names, names
        stack_name = next(n for n in names if n.endswith("_feature_0.tif"))
        with zf.open(stack_name) as fh:
            labels = tifffile.imread(fh)
        lineage = json.loads(zf.read("lineage.json"))
    assert labels.dtype == np.float32  # upstream writes y_tracked as float32 (save_numpy_array)
    assert np.array_equal(labels, np.round(labels))
    return labels.astype(np.int64), lineage


def majority(values: np.ndarray) -> int:
    return int(np.bincount(values).argmax()) if values.size else 0


def score(labels: np.ndarray, lineage: dict[str, dict], truth: np.ndarray,
          truth_lineage: dict[int, dict]) -> dict[str, float]:
    """Share of true cells followed by one id, share of ids on one true cell, division recall."""
    def consistent(a: np.ndarray, b: np.ndarray) -> float:
        cells = [int(v) for v in np.unique(a) if v]
        ok = 0
        for v in cells:
            ids = {majority(b[t][a[t] == v]) for t in range(a.shape[0]) if (a[t] == v).any()}
            ok += ids != {0} and len(ids) == 1
        return ok / max(len(cells), 1)

    to_truth = {int(cid): majority(truth[labels == int(cid)]) for cid in lineage}
    found = {(to_truth[int(cid)], *sorted(to_truth[d] for d in info["daughters"]))
             for cid, info in lineage.items() if len(info["daughters"]) == 2}
    expected = {(cid, *sorted(info["daughters"])) for cid, info in truth_lineage.items() if info["daughters"]}
    return {
        "truth_consistent": consistent(truth, labels),
        "ids_pure": consistent(labels, truth),
        "division_recall": len(found & expected) / max(len(expected), 1),
        "false_divisions": len(found - expected),
    }


@pytest.mark.parametrize(("seed", "consumer"), [(0, "tracking"), (3, "caliban")])
def test_timelapse_tracked_against_ground_truth(redis_server: RedisServer, redis_client: redis.Redis,
                                                tracking_models: ModelServer, bucket: Path,
                                                seed: int, consumer: str) -> None:
    stack, truth, truth_lineage = make_timelapse(frames=10, shape=(96, 96), n_cells=8, seed=seed)
    assert any(info["daughters"] for info in truth_lineage.values())
    key = submit_movie(redis_client, bucket, "movie.tif", stack)
    start = len(tracking_models.predicted)
    runner = run_worker(redis_server, tracking_models, bucket, consumer)
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job.get("reason")
    assert runner.stats.jobs_done == 1
    for field in ("output_url", "output_file_name", "finished_at", "total_time", "upload_time",
                  "download_time"):
        assert job[field], field

    labels, lineage = read_result(job)
    assert labels.shape == truth.shape
    assert set(map(int, lineage)) == {int(v) for v in np.unique(labels) if v}
    for cid, info in lineage.items():
        present = [t for t in range(labels.shape[0]) if (labels[t] == int(cid)).any()]
        assert info["frames"] == present
        for d in info["daughters"]:
            assert lineage[str(d)]["parent"] == int(cid)
        assert isinstance(info["capped"], bool)
    # Both tracking models were called, with upstream's tensors.
    called = {(name, version): set(shapes) for name, version, shapes in list(tracking_models.predicted)[start:]}
    assert called[("NuclearTrackingNE", 6)] == {"encoder_app_input", "encoder_morph_input",
                                                "encoder_centroid_input", "encoder_adj_input"}
    assert called[("NuclearTrackingInf", 6)] == {"current_embeddings", "current_centroids",
                                                 "future_embeddings", "future_centroids"}
    for info in lineage.values():
        assert info["capped"] == bool(info["daughters"])  # upstream caps a track when it divides
        assert sorted(info) == ["capped", "daughters", "frame_div", "frames", "label", "parent"]
    s = score(labels, lineage, truth, truth_lineage)
    print("tracking accuracy", seed, s)
    assert s["truth_consistent"] >= 0.95, s
    assert s["ids_pure"] >= 0.95, s
    assert s["division_recall"] == 1.0, s  # every true division found
    assert s["false_divisions"] == 0, s


def test_tracking_bad_inputs_fail_with_one_line(redis_server: RedisServer, redis_client: redis.Redis,
                                               tracking_models: ModelServer, bucket: Path) -> None:
    five_d = submit_movie(redis_client, bucket, "five.tif", np.zeros((2, 2, 2, 8, 8), np.float32))
    (bucket / "junk.tif").write_bytes(b"not a tiff at all")
    junk = protocol.submit_job(redis_client, QUEUE, "junk.tif", "segmentation", "1")
    order = submit_movie(redis_client, bucket, "order.tif", np.zeros((3, 16, 16), np.float32),
                         dimension_order="YX")
    missing = protocol.submit_job(redis_client, QUEUE, "nowhere.tif", "segmentation", "1")
    ok_stack, _, _ = make_timelapse(frames=3, shape=(48, 48), n_cells=3, seed=1)
    ok = submit_movie(redis_client, bucket, "ok.tif", ok_stack)
    run_worker(redis_server, tracking_models, bucket)
    for key, word in [(five_d, "dimensions"), (junk, "junk.tif"), (order, "dimension_order"),
                      (missing, "nowhere.tif")]:
        job = redis_client.hgetall(key)
        assert job["status"] == "failed", (key, job)
        assert word in job["reason"] and "\n" not in job["reason"] and "Traceback" not in job["reason"]
    assert redis_client.hget(ok, "status") == "done"


def test_movie_order() -> None:
    assert movie_order(3, (5, 64, 64)) == "TYX"
    assert movie_order(3, (2, 64, 64)) == "TYX"  # not channels: a movie is frames first
    assert movie_order(4, (5, 64, 64, 2)) == "TYXC"
    assert movie_order(4, (5, 2, 64, 64)) == "TCYX"
    assert movie_order(3, (64, 64, 5), "yxt") == "YXT"
    with pytest.raises(BadImage):
        movie_order(5, (1, 2, 3, 4, 5))


def test_tracking_through_a_fixed_size_model_tiles_every_frame(
        redis_server: RedisServer, redis_client: redis.Redis, bucket: Path) -> None:
    """A 64x64-input model: each 96x96 frame is tiled and stitched, batches of 4 tiles."""
    stack, truth, truth_lineage = make_timelapse(frames=6, shape=(96, 96), n_cells=8, seed=5)
    key = submit_movie(redis_client, bucket, "tiled.tif", stack)
    server = tracking_server(tile=64)
    try:
        run_worker(redis_server, server, bucket, TF_MAX_BATCH_SIZE="4")
    finally:
        server.stop()
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job.get("reason")
    labels, lineage = read_result(job)
    s = score(labels, lineage, truth, truth_lineage)
    assert s["truth_consistent"] >= 0.95 and s["ids_pure"] >= 0.95, s


def test_tracker_settings_reach_the_tracker() -> None:
    """MAX_DISTANCE, APPEARANCE_DIM, BIRTH, DEATH, DIVISION, TRACK_LENGTH, CROP_MODE, CALIBAN_NORM
    and the caps, with upstream's defaults (kiosk-redis-consumer settings.py at a183af9)."""
    from kiosk_worker.consumers.tracking import TrackingConsumer

    consumer = TrackingConsumer.__new__(TrackingConsumer)
    consumer.settings = load_settings({})
    p = consumer.params
    assert (p.distance_threshold, p.appearance_dim, p.birth, p.death, p.division, p.track_length,
            p.crop_mode, p.norm) == (50, 32, 0.99, 0.99, 0.9, 8, "resize", True)
    consumer.settings = load_settings({"MAX_DISTANCE": "60", "DIVISION": "0.01", "TRACK_LENGTH": "5",
                                       "APPEARANCE_DIM": "16", "CROP_MODE": "fixed", "MAX_IMAGE_FRAMES": "7",
                                       "MAX_CELLS_PER_FRAME": "9", "BIRTH": "0.5", "DEATH": "0.6"})
    p = consumer.params
    assert (p.distance_threshold, p.appearance_dim, p.birth, p.death, p.division, p.track_length,
            p.crop_mode, p.max_frames, p.max_cells) == (60, 16, 0.5, 0.6, 0.01, 5, "fixed", 7, 9)


def test_missing_tracking_model_fails_the_job_with_one_line(
        redis_server: RedisServer, redis_client: redis.Redis, model_server: ModelServer, bucket: Path) -> None:
    """Upstream has no tracker without its models: a server without NuclearTrackingNE fails the
    job, naming the model and the setting that chose it."""
    stack, _, _ = make_timelapse(frames=3, shape=(48, 48), n_cells=3, seed=1)
    key = submit_movie(redis_client, bucket, "movie.tif", stack)
    run_worker(redis_server, model_server, bucket)
    job = redis_client.hgetall(key)
    assert job["status"] == "failed", job
    assert "NuclearTrackingNE" in job["reason"] and "NEIGHBORHOOD_ENCODER" in job["reason"], job["reason"]
    assert "\n" not in job["reason"]


def test_without_tracking_models_configured_cells_are_linked_by_overlap(
        redis_server: RedisServer, redis_client: redis.Redis, bucket: Path) -> None:
    """NEIGHBORHOOD_ENCODER set empty: no tracking model is asked for; the overlap tracker links."""
    server = ModelServer(models=[build_model("segmentation", versions=(1,))]).start()  # no tracking models
    try:
        stack, truth, truth_lineage = make_timelapse(frames=8, shape=(96, 96), n_cells=8, seed=0)
        key = submit_movie(redis_client, bucket, "movie.tif", stack)
        run_worker(redis_server, server, bucket, "caliban", NEIGHBORHOOD_ENCODER="")
        job = redis_client.hgetall(key)
        assert job["status"] == "done", job.get("reason")
        assert {name for name, _, _ in server.predicted} == {"segmentation"}
        labels, lineage = read_result(job)
        s = score(labels, lineage, truth, truth_lineage)
        assert s["truth_consistent"] >= 0.95 and s["ids_pure"] >= 0.95, s
    finally:
        server.stop()
