"""End to end through the segmentation consumer: real Redis, real gRPC model server, file:// bucket."""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile
from workerkit import mean_matched_iou, result_labels, run_batch, save_tiff, settings_for, submit

import kiosk_protocol as protocol
from kiosk_model_server import ModelServer
from kiosk_model_server.synthetic import make_cells

DONE_FIELDS = ("output_url", "output_file_name", "upload_time", "download_time", "total_time",
               "finished_at")


def assert_one_line_reason(job: dict[str, str]) -> str:
    assert job["status"] == "failed", job
    reason = job["reason"]
    assert reason and "\n" not in reason and "Traceback" not in reason and len(reason) <= 300
    return reason


def test_cells_are_segmented_like_the_ground_truth(redis_client, redis_server, model_server, bucket):
    truths = {}
    keys = []
    for seed, shape, n in [(0, (256, 256), 20), (1, (128, 128), 10), (2, (160, 200), 12)]:
        image, labels = make_cells(shape, n, seed=seed)
        name = save_tiff(bucket, f"cells{seed}.tif", image)
        key = submit(redis_client, name)
        keys.append(key)
        truths[key] = labels
    runner = run_batch(settings_for(redis_server, model_server, bucket))
    assert runner.stats.jobs_done == 3 and runner.stats.jobs_failed == 0
    for key in keys:
        job = redis_client.hgetall(key)
        assert job["status"] == "done", job
        for field in DONE_FIELDS:
            assert job[field], field
        for field in ("upload_time", "download_time", "total_time"):
            assert float(job[field]) >= 0
        assert job["finished_at"].endswith("Z") and job["identity_started"] == "test-worker"
        assert job["updated_by"] == "test-worker"
        (labels,) = result_labels(bucket, job)
        assert labels.dtype == np.int32 and labels.shape == truths[key].shape
        assert mean_matched_iou(labels, truths[key]) >= 0.8
        assert int(job["object_count"]) == len(np.unique(labels[labels > 0])) > 0
        assert 0 < redis_client.ttl(key) <= 3600
    # Nothing left in flight, worker gone from the registry, output names unique.
    assert redis_client.llen(protocol.processing_key("segmentation", "test-worker")) == 0
    assert redis_client.zcard(protocol.workers_key("segmentation")) == 0
    names = {redis_client.hget(k, "output_file_name") for k in keys}
    assert len(names) == 3


def test_model_metadata_is_cached_in_redis(redis_client, redis_server, model_server, bucket):
    image, _ = make_cells((64, 64), 3, seed=3)
    for i in range(2):
        submit(redis_client, save_tiff(bucket, f"m{i}.tif", image))
    before = model_server.calls["GetModelMetadata"]
    run_batch(settings_for(redis_server, model_server, bucket, METADATA_EXPIRE_TIME=60))
    assert model_server.calls["GetModelMetadata"] - before == 1
    cached = redis_client.hget("segmentation:1", "metadata")
    assert '"image"' in cached and '"dtype": "DT_FLOAT"' in cached
    assert 0 < redis_client.ttl("segmentation:1") <= 60


def _monitor_statuses(redis_server, key: str, ready: threading.Event, stop: threading.Event,
                      out: list[str]) -> None:
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    with client.monitor() as mon:
        ready.set()
        for event in mon.listen():
            # MONITOR shows arguments space-joined; our keys and these values have no spaces.
            tokens = event["command"].split(" ")
            if tokens[0].upper() == "HSET" and tokens[1] == key:
                pairs = dict(zip(tokens[2::2], tokens[3::2], strict=False))
                if "status" in pairs:
                    out.append(pairs["status"])
                    if out[-1] in ("done", "failed"):
                        return
            if stop.is_set():
                return


def test_status_order_is_the_kiosk_sequence(redis_client, redis_server, model_server, bucket):
    image, _ = make_cells((96, 96), 6, seed=4)
    name = save_tiff(bucket, "order.tif", image)
    key = protocol.job_key("segmentation", name)
    statuses: list[str] = []
    ready, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_monitor_statuses,
                               args=(redis_server, key, ready, stop, statuses), daemon=True)
    watcher.start()
    assert ready.wait(10)
    # Written exactly as the frontend writes it (same fields, same commands).
    pipe = redis_client.pipeline(transaction=True)
    pipe.hset(key, mapping=protocol.submission_fields(name, "segmentation", "1"))
    pipe.lpush("segmentation", key)
    pipe.execute()
    run_batch(settings_for(redis_server, model_server, bucket))
    watcher.join(10)
    stop.set()
    assert statuses == ["new", "started", "pre-processing", "predicting", "post-processing",
                        "saving-results", "done"]


def test_large_images_are_tiled_for_a_fixed_size_model(redis_client, redis_server, tiled_model_server,
                                                       bucket):
    image, truth = make_cells((200, 150), 14, seed=5)
    big = submit(redis_client, save_tiff(bucket, "big.tif", image))
    small_image, small_truth = make_cells((48, 56), 2, seed=6, touching=False)
    small = submit(redis_client, save_tiff(bucket, "small.tif", small_image))
    before = tiled_model_server.calls["Predict"]
    run_batch(settings_for(redis_server, tiled_model_server, bucket, TF_MAX_BATCH_SIZE=4))
    job = redis_client.hgetall(big)
    assert job["status"] == "done", job
    (labels,) = result_labels(bucket, job)
    assert labels.shape == (200, 150)
    assert mean_matched_iou(labels, truth) >= 0.8
    (small_labels,) = result_labels(bucket, redis_client.hgetall(small))
    assert small_labels.shape == (48, 56)
    assert mean_matched_iou(small_labels, small_truth) >= 0.8
    # 200x150 in 64px tiles with overlap: 4x3 = 12 tiles in batches of <= 4, plus 1 for the small one.
    assert tiled_model_server.calls["Predict"] - before == 3 + 1


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


@pytest.mark.parametrize("kind", ["png8", "png16", "jpeg", "npy", "tiff-cyx", "tiff-channels",
                                  "tiff-stack"])
def test_input_formats_and_layouts(kind, redis_client, redis_server, model_server, bucket):
    image, truth = make_cells((128, 128), 10, seed=7)
    fields: dict[str, str] = {}
    frames = 1
    if kind == "png8":
        name = "c.png"
        _png(bucket / name, (np.clip(image, 0, 1) * 255).astype(np.uint8))
    elif kind == "png16":
        name = "c16.png"
        _png(bucket / name, (np.clip(image, 0, 1) * 65535).astype(np.uint16))
    elif kind == "jpeg":
        from PIL import Image

        name = "c.jpg"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(bucket / name, quality=95)
    elif kind == "npy":
        name = "c.npy"
        np.save(bucket / name, image)
    elif kind == "tiff-cyx":
        name = "cyx.tif"
        tifffile.imwrite(bucket / name, np.stack([np.zeros_like(image), image]),
                         photometric="minisblack")
        fields = {"dimension_order": "CYX", "channels": "1"}
    elif kind == "tiff-channels":
        name = "yxc.tif"
        tifffile.imwrite(bucket / name, np.stack([image, np.zeros_like(image), image * 0.5], axis=-1),
                         photometric="minisblack", planarconfig="contig")
        fields = {"channels": "0"}
    else:
        name = "stack.tif"
        frames = 3
        tifffile.imwrite(bucket / name, np.stack([image] * frames), photometric="minisblack")
        fields = {"dimension_order": "ZYX"}
    key = submit(redis_client, name, **fields)
    run_batch(settings_for(redis_server, model_server, bucket))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    labels = result_labels(bucket, job)
    assert len(labels) == frames
    for frame in labels:
        assert mean_matched_iou(frame, truth) >= 0.8


def _png_header_only(path: Path, height: int, width: int) -> None:
    """A PNG whose IHDR claims height x width over a few bytes of pixel data (a header parser
    reads up to the first IDAT chunk)."""
    chunks = (b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0),
              b"IDAT" + zlib.compress(b"\x00" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks))


def _npy_header_only(path: Path, shape: tuple[int, ...]) -> None:
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f8", "fortran_order": False, "shape": shape})


BAD_INPUTS = {
    # name: (setup, job fields, expected words in the reason)
    "missing": (None, {}, "not found"),
    "empty": ("empty", {}, "empty"),
    "corrupt-tiff": ("corrupt-tiff", {}, "TIFF"),
    "corrupt-png": ("corrupt-png", {}, "PNG"),
    "unsupported": ("text", {}, "unsupported input format"),
    "rank-1": ("rank1", {}, "dimension"),
    "rank-6": ("rank6", {}, "dimension"),
    "wrong-channels": ("rgb", {}, "channel"),
    "channel-out-of-range": ("gray", {"channels": "4"}, "channel 4"),
    "bad-dimension-order": ("gray", {"dimension_order": "YXZQ"}, "dimension_order"),
    "too-large-png-header": ("huge-png", {}, "over the limit"),
    "too-large-npy-header": ("huge-npy", {}, "over the limit"),
    "unknown-model": ("gray", {"model": "no-such-model"}, "not served"),
    "unknown-version": ("gray", {"version": "9"}, "not served"),
    "bad-version": ("gray", {"version": "latest!"}, "model_version"),
    # No model_name: NUCLEAR_MODEL (NuclearSegmentation:6), which this server does not serve.
    "no-model": ("gray", {"model": "", "version": ""}, "NUCLEAR_MODEL chose it"),
}


def _make_bad(bucket: Path, case: str, setup: str | None) -> str:
    name = f"{case}.tif"
    rng = np.random.default_rng(0)
    if setup is None:
        return "does/not/exist.tif"
    if setup == "empty":
        (bucket / name).write_bytes(b"")
    elif setup == "corrupt-tiff":
        (bucket / name).write_bytes(b"II*\x00" + rng.bytes(200))
    elif setup == "corrupt-png":
        name = f"{case}.png"
        (bucket / name).write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    elif setup == "text":
        name = f"{case}.txt"
        (bucket / name).write_text("hello, not an image\n")
    elif setup == "rank1":
        name = f"{case}.npy"
        np.save(bucket / name, np.arange(100, dtype=np.float32))
    elif setup == "rank6":
        name = f"{case}.npy"
        np.save(bucket / name, np.zeros((1, 1, 1, 8, 8, 1), dtype=np.float32))
    elif setup == "rgb":
        tifffile.imwrite(bucket / name, rng.random((64, 64, 3), dtype=np.float32),
                         photometric="minisblack", planarconfig="contig")
    elif setup == "gray":
        tifffile.imwrite(bucket / name, rng.random((64, 64), dtype=np.float32))
    elif setup == "huge-png":
        name = f"{case}.png"
        _png_header_only(bucket / name, 40000, 30000)
    elif setup == "huge-npy":
        name = f"{case}.npy"
        _npy_header_only(bucket / name, (50000, 50000))
    return name


def test_every_bad_input_fails_with_a_one_line_reason_and_the_worker_goes_on(
        redis_client, redis_server, model_server, bucket):
    good_image, truth = make_cells((96, 96), 6, seed=8)
    good_name = save_tiff(bucket, "good.tif", good_image)
    bad_keys = {}
    good_keys = []
    for case, (setup, fields, _) in BAD_INPUTS.items():
        fields = dict(fields)
        name = _make_bad(bucket, case, setup)
        bad_keys[case] = submit(redis_client, name, model=fields.pop("model", "segmentation"),
                                version=fields.pop("version", "1"), **fields)
        good_keys.append(submit(redis_client, good_name))  # after every bad job, a good one
    runner = run_batch(settings_for(redis_server, model_server, bucket, MAX_RETRY=0))
    for case, key in bad_keys.items():
        reason = assert_one_line_reason(redis_client.hgetall(key))
        assert BAD_INPUTS[case][2].lower() in reason.lower(), (case, reason)
    for key in good_keys:
        job = redis_client.hgetall(key)
        assert job["status"] == "done", job
    assert runner.stats.jobs_failed == len(bad_keys)
    assert runner.stats.jobs_done == len(good_keys)
    assert redis_client.llen(protocol.processing_key("segmentation", "test-worker")) == 0


def test_model_server_unreachable_fails_after_bounded_retries(redis_client, redis_server, bucket):
    from harness.ports import free_port

    image, _ = make_cells((64, 64), 3, seed=9)
    key = submit(redis_client, save_tiff(bucket, "x.tif", image))
    dead = ModelServer(models=["segmentation"], port=free_port())  # never started
    dead.port = dead._requested_port  # noqa: SLF001 - a port nobody listens on
    run_batch(settings_for(redis_server, dead, bucket, MAX_RETRY=2, GRPC_BACKOFF=0.01, GRPC_TIMEOUT=2))
    reason = assert_one_line_reason(redis_client.hgetall(key))
    assert "unreachable after 2 retries" in reason


def test_transient_model_server_faults_are_retried_then_the_next_job_runs(
        redis_client, redis_server, model_server, bucket):
    image, truth = make_cells((64, 64), 3, seed=10)
    name = save_tiff(bucket, "t.tif", image)
    first = submit(redis_client, name)
    second = submit(redis_client, name)
    third = submit(redis_client, name)
    # 3 failures exhaust 1 try + 2 retries of the first job; the second sees 1 and recovers.
    model_server.fail_next(4, "UNAVAILABLE")
    try:
        run_batch(settings_for(redis_server, model_server, bucket, MAX_RETRY=2, METADATA_EXPIRE_TIME=0))
    finally:
        model_server.fail_next(0)
    assert "unreachable after 2 retries" in assert_one_line_reason(redis_client.hgetall(first))
    assert redis_client.hget(second, "status") == "done"
    assert redis_client.hget(third, "status") == "done"


def test_vanished_and_finished_jobs_are_skipped(redis_client, redis_server, model_server, bucket):
    redis_client.lpush("segmentation", "segmentation:ghost.tif:1")
    done_key = submit(redis_client, "whatever.tif")
    redis_client.hset(done_key, "status", "done")
    runner = run_batch(settings_for(redis_server, model_server, bucket))
    assert runner.stats.items_taken == 2 and runner.stats.jobs_done == 0
    assert not redis_client.exists("segmentation:ghost.tif:1")
    assert redis_client.hget(done_key, "status") == "done"
    assert redis_client.llen(protocol.processing_key("segmentation", "test-worker")) == 0
