"""Jobs exactly as the Kiosk frontend writes them, end to end through the worker.

Real redis-server, our model server over real gRPC serving the Kiosk's default model names
(NuclearSegmentation:6, CytoplasmSegmentation:5, PhaseCytoSegmentation:0), a file:// bucket.
The frontend leaves ``model_name`` empty, so the worker must pick models as the Kiosk's
consumer does (NUCLEAR_MODEL / CYTOPLASM_MODEL / PHASE_MODEL by ``channels`` position) and
read ``dimension_order`` / ``channels`` / ``scale`` as it does. Expected results come from
``kiosk_upstream`` (a restatement of kiosk-redis-consumer's rules), not from the worker's code.
"""

from __future__ import annotations

import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile
from kiosk_upstream import DEFAULT_CHOICES, FRONTEND_ORDERS, upstream_bxyc, upstream_steps
from scipy.optimize import linear_sum_assignment
from workerkit import mean_matched_iou, run_batch, settings_for

from kiosk_model_server import ModelServer
from kiosk_model_server.models import build_model
from kiosk_model_server.synthetic import make_cells, make_timelapse

#: The array's first and second spatial axes (the Kiosk calls the first one X). Not square,
#: so a transposed result cannot pass for a right one.
X, Y = 72, 56
QUEUE = "segmentation"


# --- the frontend's writes ------------------------------------------------------------------


def js_string(value: float | str) -> str:
    """A form value as ioredis sends it (JavaScript's String(number): 1 -> '1', 0.5 -> '0.5')."""
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def frontend_submit(client: redis.Redis, queue: str, image_name: str, uploaded_name: str,
                    job_form: dict[str, object]) -> str:
    """The frontend's ``predict`` handler: one HMSET of these fields in this order, then LPUSH.

    kiosk-frontend server/controllers/predict.controller.js at
    cd5c8c39c1bb2d7530c2eb79fe138697322f67d2 (every optional field ``data.x || ''``; the job
    form as SegmentationForm.js sets it: dimensionOrder, selectedChannels.join(','), scale).
    """
    key = f"{queue}:{image_name}:{uuid.uuid4()}"
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    scale = job_form.get("scale")
    fields = [
        "original_name", image_name,
        "input_file_name", uploaded_name,
        "model_name", "",
        "model_version", "",
        "postprocess_function", "",
        "preprocess_function", "",
        "cuts", "0",
        "url", "",
        "label", "",
        "status", "new",
        "created_at", now,
        "updated_at", now,
        "identity_upload", "kiosk-frontend-test",
        "dimension_order", str(job_form.get("dimensionOrder") or ""),
        "channels", str(job_form.get("selectedChannels") or ""),
        "scale", js_string(scale) if scale else "",
        "segmentation_type", "",
    ]
    client.execute_command("HMSET", key, *fields)
    client.execute_command("LPUSH", queue, key)
    return key


# --- inputs ---------------------------------------------------------------------------------


def cells(batches: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (B, X, Y, C) image where every (batch, channel) holds different cells, and its truth."""
    image = np.zeros((batches, X, Y, channels), np.float32)
    truth = np.zeros((batches, X, Y, channels), np.int32)
    for b in range(batches):
        for c in range(channels):
            image[b, ..., c], truth[b, ..., c] = make_cells((X, Y), 4, seed=seed + 10 * b + c, touching=False)
    return image, truth


def as_file(bxyc: np.ndarray, order: str) -> np.ndarray:
    """The image stored with its axes in the order's letters (B and C absent if not named)."""
    letters = "BXYC"
    if "C" not in order:
        bxyc, letters = bxyc[..., 0], "BXY"
    if "B" not in order:
        bxyc, letters = bxyc[0], letters[1:]
    return np.transpose(bxyc, [letters.index(a) for a in order])


def upload(bucket: Path, name: str, array: np.ndarray) -> str:
    """As the frontend's upload: a unique name in the bucket; returns it."""
    uploaded = f"uploads/{uuid.uuid4().hex}/{name}"
    (bucket / uploaded).parent.mkdir(parents=True)
    if name.endswith(".png"):
        from PIL import Image

        Image.fromarray(array).save(bucket / uploaded)
    else:
        tifffile.imwrite(bucket / uploaded, array, photometric="minisblack")
    return uploaded


def result_images(job: dict[str, str]) -> list[np.ndarray]:
    with zipfile.ZipFile(job["output_url"]) as zf:
        return [tifffile.imread(zf.open(name)) for name in sorted(zf.namelist())]


def assert_labels_match(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Every expected label image has its own result image, same shape, cells matched."""
    assert len(got) == len(expected), (len(got), len(expected))
    for image in got:
        assert image.shape == expected[0].shape, (image.shape, expected[0].shape)
    scores = np.array([[mean_matched_iou(g, e) for g in got] for e in expected])
    rows, cols = linear_sum_assignment(-scores)
    assert scores[rows, cols].min() >= 0.6, scores  # a wrong channel or batch item scores ~0.1


def assert_one_line_failure(job: dict[str, str], fragment: str) -> None:
    assert job["status"] == "failed", job
    reason = job["reason"]
    assert "\n" not in reason and "Traceback" not in reason and len(reason) <= 300, reason
    assert fragment in reason, (fragment, reason)


@pytest.fixture(scope="module")
def kiosk_models() -> Iterator[ModelServer]:
    """The Kiosk's default models (the deep-watershed stand-in under their names and versions)."""
    server = ModelServer(models=["NuclearSegmentation", "CytoplasmSegmentation", "PhaseCytoSegmentation",
                                 "NuclearTrackingInf", "NuclearTrackingNE"]).start()
    yield server
    server.stop()


def predicted_since(server: ModelServer, start: int) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(name, version, shapes["image"]) for name, version, shapes in list(server.predicted)[start:]
            if "image" in shapes]


# --- tests ----------------------------------------------------------------------------------

#: channels sent with each order (the segmentation form's nuclei/cytoplasm entries, and more).
CHANNELS = {"XY": "0,", "BXY": ",0", "CXY": "0,1,", "XYB": "0,", "XYC": "1,0", "BXYC": "0,1",
            "CXYB": ",1"}


def test_frontend_segmentation_jobs_in_every_dimension_order(redis_client, redis_server, kiosk_models, bucket):
    """Each order the frontend offers on 2-D, 3-D and 4-D images: the matching rank is
    segmented as upstream reads it, the others fail with a one-line reason."""
    jobs = {}  # key -> (order, rank, expected labels, steps, batches) or the failure fragment
    seed = 0
    for order in (*FRONTEND_ORDERS, ""):
        for rank in (2, 3, 4):
            seed += 100
            named = order or {2: "XY", 3: "XYC", 4: "BXYC"}[rank]  # '' = our guess (upstream fails)
            batches = 2 if "B" in named else 1
            n_channels = 2 if "C" in named else 1
            image, truth = cells(batches, n_channels, seed)
            if len(named) != rank:  # a file of the wrong rank for this order
                shape = (X, Y) + (2,) * (rank - 2)
                name = upload(bucket, f"wrong{rank}.tif", np.zeros(shape, np.float32))
                key = frontend_submit(redis_client, QUEUE, f"wrong{rank}.tif", name,
                                      {"dimensionOrder": order, "selectedChannels": "0,", "scale": 1})
                jobs[key] = f"dimension_order '{order}' has {len(order)} axes but the image has {rank}"
                continue
            stored = as_file(image, named)
            assert stored.ndim == rank
            assert np.array_equal(upstream_bxyc(stored, named), image)  # our data, upstream's reading
            channels = CHANNELS.get(order, "0," if n_channels == 1 else "0,1,")
            steps = upstream_steps(channels)
            expected = [truth[b, ..., ch] for _, ch in steps for b in range(batches)]
            name = upload(bucket, f"cells_{named}.tif", stored)
            key = frontend_submit(redis_client, QUEUE, f"cells_{named}.tif", name,
                                  {"dimensionOrder": order, "selectedChannels": channels, "scale": 1})
            jobs[key] = (order, rank, expected, steps, batches)
    start = len(kiosk_models.predicted)
    run_batch(settings_for(redis_server, kiosk_models, bucket, TF_MAX_BATCH_SIZE=1))

    expected_calls: Counter[tuple[str, int]] = Counter()
    for key, want in jobs.items():
        job = redis_client.hgetall(key)
        if isinstance(want, str):
            assert_one_line_failure(job, want)
            continue
        order, rank, expected, steps, batches = want
        assert job["status"] == "done", (order, rank, job)
        assert_labels_match(result_images(job), expected)
        for pos, _ in steps:
            expected_calls[DEFAULT_CHOICES[pos]] += batches  # TF_MAX_BATCH_SIZE=1: a call per item
    calls = predicted_since(kiosk_models, start)
    assert Counter((name, version) for name, version, _ in calls) == expected_calls
    # Each model got one channel in the input's own orientation.
    assert {shape for _, _, shape in calls} == {(1, X, Y, 1)}


def test_grayscale_and_rgb_pngs_with_the_default_xyb(redis_client, redis_server, kiosk_models, bucket):
    """The form's default XYB on a PNG: upstream loads PNGs with a channel axis, so a
    grayscale PNG is one batch item and an RGB PNG three (one per band)."""
    image, truth = make_cells((X, Y), 4, seed=7, touching=False)
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    form = {"dimensionOrder": "XYB", "selectedChannels": "0,", "scale": 1}
    gray_key = frontend_submit(redis_client, QUEUE, "gray.png", upload(bucket, "gray.png", gray), form)
    rgb = np.stack([gray, gray // 2, np.zeros_like(gray)], axis=-1)
    rgb_key = frontend_submit(redis_client, QUEUE, "rgb.png", upload(bucket, "rgb.png", rgb), form)
    xy_key = frontend_submit(redis_client, QUEUE, "xy.png", upload(bucket, "xy.png", gray),
                             {**form, "dimensionOrder": "XY"})
    four_key = frontend_submit(redis_client, QUEUE, "four.png", upload(bucket, "four.png", gray),
                               {**form, "dimensionOrder": "BXYC"})
    run_batch(settings_for(redis_server, kiosk_models, bucket))
    gray_job, rgb_job = redis_client.hgetall(gray_key), redis_client.hgetall(rgb_key)
    assert gray_job["status"] == "done", gray_job
    assert_labels_match(result_images(gray_job), [truth])
    assert rgb_job["status"] == "done", rgb_job
    rgb_labels = result_images(rgb_job)
    assert len(rgb_labels) == 3 and all(lab.shape == (X, Y) for lab in rgb_labels)
    assert mean_matched_iou(rgb_labels[0], truth) >= 0.6 and not rgb_labels[2].any()
    # Ours also takes a grayscale PNG as XY (upstream would fail it); BXYC does not fit.
    assert redis_client.hget(xy_key, "status") == "done"
    assert_one_line_failure(redis_client.hgetall(four_key), "dimension_order 'BXYC' has 4 axes")


def test_models_come_from_the_environment_and_a_named_model_wins(redis_client, redis_server, bucket):
    image, truth = cells(1, 2, seed=40)
    models = [build_model("segmentation", "MyNuclear", (3,)), "PhaseCytoSegmentation", "segmentation"]
    with ModelServer(models=models) as server:
        name = upload(bucket, "two.tif", as_file(image, "XYC"))
        key = frontend_submit(redis_client, QUEUE, "two.tif", name,
                              {"dimensionOrder": "XYC", "selectedChannels": "0,,1", "scale": 1})
        settings = settings_for(redis_server, server, bucket, NUCLEAR_MODEL="MyNuclear:3")
        run_batch(settings)
        job = redis_client.hgetall(key)
        assert job["status"] == "done", job
        # Position 0 (NUCLEAR_MODEL) on channel 0, position 2 (PHASE_MODEL) on channel 1.
        assert [(n, v) for n, v, _ in predicted_since(server, 0)] == [("MyNuclear", 3), ("PhaseCytoSegmentation", 0)]
        assert_labels_match(result_images(job), [truth[0, ..., 0], truth[0, ..., 1]])

        # The job's own model_name/model_version win over the environment.
        start = len(server.predicted)
        named = frontend_submit(redis_client, QUEUE, "two.tif", name,
                                {"dimensionOrder": "XYC", "selectedChannels": "1,", "scale": 1})
        redis_client.hset(named, mapping={"model_name": "segmentation", "model_version": "1"})
        run_batch(settings)
        job = redis_client.hgetall(named)
        assert job["status"] == "done", job
        assert [(n, v) for n, v, _ in predicted_since(server, start)] == [("segmentation", 1)]
        assert_labels_match(result_images(job), [truth[0, ..., 1]])


def test_scale_resizes_to_the_model_and_labels_back(redis_client, redis_server, kiosk_models, bucket):
    """upstream: image_mpp = scale * model_mpp, so the model sees the image resized by scale."""
    up_image, up_truth = make_cells((X, Y), 5, seed=51)
    down_image, down_truth = make_cells((128, 96), 4, seed=52)
    form = {"dimensionOrder": "XY", "selectedChannels": "0,"}
    up = frontend_submit(redis_client, QUEUE, "up.tif", upload(bucket, "up.tif", up_image), {**form, "scale": 2})
    down = frontend_submit(redis_client, QUEUE, "down.tif", upload(bucket, "down.tif", down_image),
                           {**form, "scale": 0.5})
    blank = frontend_submit(redis_client, QUEUE, "same.tif", upload(bucket, "same.tif", up_image),
                            {**form, "scale": ""})
    start = len(kiosk_models.predicted)
    run_batch(settings_for(redis_server, kiosk_models, bucket))
    shapes = Counter(shape for _, _, shape in predicted_since(kiosk_models, start))
    assert shapes == Counter({(1, 2 * X, 2 * Y, 1): 1, (1, 64, 48, 1): 1, (1, X, Y, 1): 1})
    for key, truth in ((up, up_truth), (down, down_truth), (blank, up_truth)):
        job = redis_client.hgetall(key)
        assert job["status"] == "done", job
        (labels,) = result_images(job)
        assert labels.shape == truth.shape
        assert mean_matched_iou(labels, truth) >= 0.7
    assert redis_client.hget(blank, "scale") == "1"  # upstream writes back the scale it used
    assert redis_client.hget(up, "scale") == "2"


BAD_JOBS = {
    # case: (file shape, form, fragment of the reason)
    "channel-out-of-range": ((X, Y, 2), {"dimensionOrder": "XYC", "selectedChannels": "0,2"},
                             "asks for channel 2 but the image has 2"),
    "gray-channel-1": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": ",1"},
                       "asks for channel 1 but the image has 1"),
    "more-entries-than-channels": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "0,0"},
                                   "the image has 1 channel(s) but channels '0,0' names 2"),
    "position-without-model": ((X, Y, 4), {"dimensionOrder": "XYC", "selectedChannels": ",,,3"},
                               "position 3, which has no model"),
    "no-channel": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": ","}, "names no channel"),
    "not-a-channel": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "red,"},
                      "comma-separated channel numbers"),
    "rank": ((X, Y), {"dimensionOrder": "XYB", "selectedChannels": "0,"},
             "dimension_order 'XYB' has 3 axes but the image has 2"),
    "unknown-order": ((X, Y, 2), {"dimensionOrder": "XYQ", "selectedChannels": "0,"}, "dimension_order"),
    "scale-text": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "0,", "scale": "big"},
                   "scale 'big' is not a number"),
    "scale-high": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "0,", "scale": 11},
                   "scale 11 is outside the valid range [0.1, 10] (MIN_SCALE, MAX_SCALE)"),
    "scale-low": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "0,", "scale": 0.05},
                  "outside the valid range"),
    "scale-negative": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "0,", "scale": -1},
                       "outside the valid range"),
    "scale-nan": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "0,", "scale": "NaN"},
                  "outside the valid range"),
    "scale-too-big-image": ((X, Y), {"dimensionOrder": "XY", "selectedChannels": "0,", "scale": 9},
                            "over the limit of 512x512"),
}


def test_bad_frontend_jobs_fail_with_one_line(redis_client, redis_server, kiosk_models, bucket):
    keys = {}
    for case, (shape, form, _) in BAD_JOBS.items():
        name = upload(bucket, f"{case}.tif", np.ones(shape, np.float32))
        keys[case] = frontend_submit(redis_client, QUEUE, f"{case}.tif", name, form)
    start = len(kiosk_models.predicted)
    run_batch(settings_for(redis_server, kiosk_models, bucket, MAX_IMAGE_HEIGHT=512, MAX_IMAGE_WIDTH=512))
    for case, key in keys.items():
        assert_one_line_failure(redis_client.hgetall(key), BAD_JOBS[case][2])
    assert predicted_since(kiosk_models, start) == []  # all refused before any model call


def test_scale_detection_is_refused_not_ignored(redis_client, redis_server, kiosk_models, bucket):
    image, _ = make_cells((X, Y), 4, seed=60)
    name = upload(bucket, "detect.tif", image)
    form = {"dimensionOrder": "XY", "selectedChannels": "0,"}
    detect = frontend_submit(redis_client, QUEUE, "detect.tif", name, {**form, "scale": ""})
    given = frontend_submit(redis_client, QUEUE, "given.tif", name, {**form, "scale": 1})
    run_batch(settings_for(redis_server, kiosk_models, bucket, SCALE_DETECT_ENABLED="true", MIN_SCALE="0.5",
                           MAX_SCALE="2"))
    assert_one_line_failure(redis_client.hgetall(detect), "SCALE_DETECT_ENABLED")
    assert redis_client.hget(given, "status") == "done"


def test_tracking_jobs_without_a_model_segment_with_nuclear_model(redis_client, redis_server, kiosk_models, bucket):
    """The caliban form sends no model, channels or dimension_order; frames over
    MAX_IMAGE_FRAMES and several channel positions fail."""
    stack, truth, _ = make_timelapse(frames=3, shape=(48, 40), n_cells=3, seed=3)
    form = {"dimensionOrder": "", "selectedChannels": "", "scale": ""}
    ok = frontend_submit(redis_client, "track", "movie.tif", upload(bucket, "movie.tif", stack), form)
    long_stack = np.concatenate([stack, stack])
    too_long = frontend_submit(redis_client, "track", "long.tif", upload(bucket, "long.tif", long_stack), form)
    two = np.stack([stack, stack], axis=-1)
    both = frontend_submit(redis_client, "track", "two.tif", upload(bucket, "two.tif", two),
                           {**form, "selectedChannels": "0,1"})
    start = len(kiosk_models.predicted)
    run_batch(settings_for(redis_server, kiosk_models, bucket, QUEUE="track", CONSUMER_TYPE="tracking",
                           MAX_IMAGE_FRAMES=5, TF_MAX_BATCH_SIZE=1))
    job = redis_client.hgetall(ok)
    assert job["status"] == "done", job
    assert {(n, v, s) for n, v, s in predicted_since(kiosk_models, start)} == {
        ("NuclearSegmentation", 6, (1, 48, 40, 1))}
    with zipfile.ZipFile(job["output_url"]) as zf:
        tracked = next(n for n in zf.namelist() if n.endswith(".tif"))
        labels = tifffile.imread(zf.open(tracked))
    assert labels.shape == truth.shape
    assert all(mean_matched_iou(labels[t], truth[t]) >= 0.6 for t in range(len(truth)))
    assert_one_line_failure(redis_client.hgetall(too_long), "6 frames, over the limit of 5 (MAX_IMAGE_FRAMES)")
    assert_one_line_failure(redis_client.hgetall(both), "tracking follows one")
