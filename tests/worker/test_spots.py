"""The spot and polaris consumers end to end: real redis-server, the
SpotDetection stand-in (deepcell-spots' signature) over real gRPC, a file:// bucket, jobs as the
Kiosk frontend writes them. Spots are compared with ``make_spots``' ground truth."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy.optimize import linear_sum_assignment
from test_frontend_jobs import frontend_submit
from workerkit import mean_matched_iou, run_batch, settings_for

import kiosk_protocol as protocol
from kiosk_model_server import ModelServer
from kiosk_model_server.mesmer_model import make_tissue
from kiosk_model_server.models import build_model
from kiosk_model_server.spot_model import make_spots
from kiosk_protocol import zipjobs

#: A detected spot within this many pixels of a true one is a match.
MATCH_DISTANCE = 1.5


@pytest.fixture(scope="module")
def spot_server() -> Iterator[ModelServer]:
    server = ModelServer(models=[build_model("SpotDetection")]).start()  # versions 1 and 3
    yield server
    server.stop()


def spot_settings(redis_server, server: ModelServer, bucket: Path, **extra: object):
    return settings_for(redis_server, server, bucket, QUEUE="spot", CONSUMER_TYPE="spot", **extra)


def result_spots(job: dict[str, str]) -> dict[str, np.ndarray]:
    """Zip member name -> array (coordinates for .npy, the marked frame for .tif)."""
    out = {}
    with zipfile.ZipFile(job["output_url"]) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            out[name] = np.load(io.BytesIO(data)) if name.endswith(".npy") else tifffile.imread(io.BytesIO(data))
    return out


def recall_precision(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    if not len(found) or not len(truth):
        return 0.0, 0.0
    dist = np.hypot(found[:, None, 0] - truth[None, :, 0], found[:, None, 1] - truth[None, :, 1])
    rows, cols = linear_sum_assignment(dist)
    matched = int((dist[rows, cols] <= MATCH_DISTANCE).sum())
    return matched / len(truth), matched / len(found)


def test_spots_match_the_ground_truth(redis_client, redis_server, spot_server, bucket):
    truths = {}
    for seed, shape, n in [(0, (128, 128), 40), (1, (96, 160), 30)]:
        image, spots = make_spots(shape, n, seed=seed)
        name = f"spots{seed}.tif"
        tifffile.imwrite(bucket / name, (np.clip(image, 0, None) * 1000).astype(np.uint16))
        key = frontend_submit(redis_client, "spot", name, name, {})
        truths[key] = spots
    runner = run_batch(spot_settings(redis_server, spot_server, bucket))
    assert runner.stats.jobs_done == 2 and runner.stats.jobs_failed == 0
    for key, truth in truths.items():
        job = redis_client.hgetall(key)
        assert job["status"] == "done", job
        stem = Path(job["original_name"]).stem
        members = result_spots(job)
        assert sorted(members) == [f"{stem}_0.npy", f"{stem}_0.tif"]
        coords = members[f"{stem}_0.npy"]
        assert coords.ndim == 2 and coords.shape[1] == 2 and coords.dtype == np.float64
        recall, precision = recall_precision(coords, truth)
        assert recall >= 0.9 and precision >= 0.9, (recall, precision)
        assert members[f"{stem}_0.tif"].shape == tifffile.imread(bucket / job["input_file_name"]).shape


def test_polaris_threshold_is_applied(redis_client, redis_server, spot_server, bucket):
    image, _ = make_spots((64, 64), 10, seed=2)
    tifffile.imwrite(bucket / "t.tif", image)
    key = frontend_submit(redis_client, "spot", "t.tif", "t.tif", {})
    # The stand-in's spot probability is 0.999: a threshold of 1 keeps no spot.
    run_batch(spot_settings(redis_server, spot_server, bucket, POLARIS_THRESHOLD="1"))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    assert result_spots(job)["t_0.npy"].shape == (0, 2)


def test_frames_of_a_stack_are_batches(redis_client, redis_server, spot_server, bucket):
    frames = [make_spots((80, 80), 12, seed=s) for s in (3, 4)]
    tifffile.imwrite(bucket / "stack.tif", np.stack([f[0] for f in frames]))
    key = frontend_submit(redis_client, "spot", "stack.tif", "stack.tif", {"dimensionOrder": "BXY"})
    run_batch(spot_settings(redis_server, spot_server, bucket))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    members = result_spots(job)
    for i, (_, truth) in enumerate(frames):
        recall, precision = recall_precision(members[f"stack_{i}.npy"], truth)
        assert recall >= 0.9 and precision >= 0.9, (i, recall, precision)


def test_spot_zip_goes_through_the_zip_parent(redis_client, redis_server, spot_server, bucket):
    truths = {}
    (bucket / "uploads").mkdir()
    with zipfile.ZipFile(bucket / "uploads" / "spots.zip", "w") as zf:
        for seed in (5, 6):
            image, truths[f"s{seed}"] = make_spots((64, 64), 10, seed=seed)
            buf = io.BytesIO()
            tifffile.imwrite(buf, image)
            zf.writestr(f"s{seed}.tif", buf.getvalue())
    parent = protocol.submit_job(redis_client, "spot", "uploads/spots.zip")
    assert parent.startswith("spot-zip:")
    zip_settings = settings_for(redis_server, spot_server, bucket, QUEUE="spot-zip", CONSUMER_TYPE="zip")
    run_batch(zip_settings, max_jobs=1)
    children = zipjobs.split_keys(redis_client.hget(parent, "children"))
    assert len(children) == 2 and all(c.startswith("spot:") for c in children)
    run_batch(spot_settings(redis_server, spot_server, bucket))
    run_batch(zip_settings, max_jobs=1)
    job = redis_client.hgetall(parent)
    assert job["status"] == "done", job
    with zipfile.ZipFile(job["output_url"]) as zf:
        npys = [n for n in zf.namelist() if n.endswith(".npy")]
        assert len(npys) == 2, zf.namelist()
        for name in npys:
            stem = next(s for s in truths if s in name)
            recall, precision = recall_precision(np.load(io.BytesIO(zf.read(name))), truths[stem])
            assert recall >= 0.9 and precision >= 0.9


def polaris_settings(redis_server, server: ModelServer, bucket: Path):
    return settings_for(redis_server, server, bucket, QUEUE="polaris", CONSUMER_TYPE="polaris")


def test_polaris_spots_only_writes_upstream_csv(redis_client, redis_server, spot_server, bucket):
    image, truth = make_spots((96, 112), 25, seed=7)
    decoy, _ = make_spots((96, 112), 25, seed=70)
    tifffile.imwrite(bucket / "p.tif", np.stack([decoy, image], axis=-1), photometric="minisblack")
    # channels: spots, nuclear, cytoplasm (upstream's order); the spots are in image channel 1.
    key = protocol.submit_job(redis_client, "polaris", "p.tif", channels="1,0,",
                              segmentation_type="none", dimension_order="XYC")
    run_batch(polaris_settings(redis_server, spot_server, bucket))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    with zipfile.ZipFile(job["output_url"]) as zf:
        assert zf.namelist() == ["p_0.csv"]
        lines = zf.read("p_0.csv").decode().split("\r\n")
    assert lines[0] == "x,y" and lines[-1] == ""
    xy = np.array([[float(v) for v in line.split(",")] for line in lines[1:-1]])
    recall, precision = recall_precision(xy[:, ::-1], truth)  # rows are x (column), y (row)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


@pytest.mark.parametrize("kind, channels", [("", "0,1,2"), ("cell", "0,1,2"),
                                             ("cell culture", "0,,"), ("tissue", "0,1,")])
def test_polaris_bad_segmentation_type_fails_with_a_one_line_reason(kind, channels, redis_client,
                                                                   redis_server, spot_server, bucket):
    image, _ = make_spots((64, 64), 10, seed=7)
    tifffile.imwrite(bucket / "p.tif", np.stack([image, image, image], axis=-1),
                     photometric="minisblack")
    key = protocol.submit_job(redis_client, "polaris", "p.tif", channels=channels,
                              segmentation_type=kind)
    runner = run_batch(polaris_settings(redis_server, spot_server, bucket))
    assert runner.stats.jobs_failed == 1
    job = redis_client.hgetall(key)
    assert job["status"] == "failed" and "\n" not in job["reason"], job
    assert ("segmentation_type" in job["reason"]) if kind in ("", "cell") else ("channel" in job["reason"])


@pytest.fixture(scope="module")
def polaris_server() -> Iterator[ModelServer]:
    """Every model a kiosk-console polaris worker calls, under upstream's names."""
    names = ["SpotDetection", "NuclearSegmentation", "CytoplasmSegmentation", "MultiplexSegmentation"]
    server = ModelServer(models=[build_model(n) for n in names]).start()
    yield server
    server.stop()


def fish_image(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) spots, nuclear, cytoplasm image; true spots; whole-cell and nuclear labels.
    Cells of radius ~40 px, so that at POLARIS_SCALE (0.38) they have the size the
    segmentation models expect."""
    tissue, cells, nuclei = make_tissue((384, 384), 8, seed=seed, radius=40)
    spots, truth = make_spots((384, 384), 60, seed=seed, min_gap=8)
    return np.stack([spots, tissue[..., 0], tissue[..., 1]], axis=-1), truth, cells, nuclei


def assigned_correctly(rows: np.ndarray, column: np.ndarray, labels: np.ndarray,
                       truth_spots: np.ndarray, truth_labels: np.ndarray) -> float:
    """Fraction of true spots whose matched found spot names the cell (0 = none) the truth
    puts it in; predicted label ids are mapped to true ones by their largest overlap."""
    mapping = {0: 0}
    for p in np.unique(labels[labels > 0]):
        under = truth_labels[labels == p]
        mapping[int(p)] = int(np.bincount(under).argmax())
    found = rows[:, [1, 0]]  # [y, x]
    dist = np.hypot(found[:, None, 0] - truth_spots[None, :, 0], found[:, None, 1] - truth_spots[None, :, 1])
    r, c = linear_sum_assignment(dist)
    good = 0
    for i, j in zip(r, c, strict=True):
        y, x = truth_spots[j]
        if dist[i, j] <= MATCH_DISTANCE and mapping.get(int(column[i]), -1) == truth_labels[int(y), int(x)]:
            good += 1
    return good / len(truth_spots)


def read_polaris(job: dict[str, str]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """(CSV header, CSV rows as floats, label images in feature order) of a polaris result."""
    with zipfile.ZipFile(job["output_url"]) as zf:
        names = zf.namelist()
        csvs = [n for n in names if n.endswith(".csv")]
        assert csvs == ["fish_0.csv"], names
        lines = zf.read("fish_0.csv").decode().split("\r\n")
        tifs = sorted(n for n in names if n.endswith(".tif"))
        labels = [tifffile.imread(io.BytesIO(zf.read(n))) for n in tifs]
    assert lines[-1] == ""
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:-1]])
    return lines[0].split(","), rows, labels


@pytest.mark.parametrize("kind, compartment", [("cell culture", None), ("tissue", "whole-cell"),
                                               ("tissue", "both")])
def test_polaris_segments_and_assigns_spots_to_cells(kind, compartment, redis_client, redis_server,
                                                     polaris_server, bucket):
    image, truth, cells, nuclei = fish_image(seed=11)
    tifffile.imwrite(bucket / "fish.tif", image, photometric="minisblack")
    key = frontend_submit(redis_client, "polaris", "fish.tif", "fish.tif",
                          {"dimensionOrder": "XYC", "selectedChannels": "0,1,2"})
    redis_client.hset(key, "segmentation_type", kind)  # the polaris form's choice
    extra = {"MESMER_COMPARTMENT": compartment} if compartment else {}
    run_batch(settings_for(redis_server, polaris_server, bucket, QUEUE="polaris",
                           CONSUMER_TYPE="polaris", **extra))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    header, rows, labels = read_polaris(job)
    # Label channels as upstream stacks them: cell culture nuclear then cytoplasm; tissue as
    # Mesmer's compartments (whole-cell first).
    if kind == "cell culture" or compartment == "both":
        assert header == ["x", "y", "cellID0", "cellID1"] and len(labels) == 2
        truths = [nuclei, cells] if kind == "cell culture" else [cells, nuclei]
    else:
        assert header == ["x", "y", "cellID0"] and len(labels) == 1
        truths = [cells]
    recall, precision = recall_precision(rows[:, [1, 0]], truth)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)
    for k, (pred, true) in enumerate(zip(labels, truths, strict=True)):
        assert pred.shape == true.shape and mean_matched_iou(pred, true) >= 0.8, k
        assert assigned_correctly(rows, rows[:, 2 + k], pred, truth, true) >= 0.9, k
    assert int(job["object_count"]) > 0


@pytest.mark.parametrize("clip", [False, True])
def test_polaris_clip_tames_a_hot_pixel(clip, redis_client, redis_server, spot_server, bucket):
    image, truth = make_spots((128, 128), 30, seed=8)
    image[5, 5] = 100.0  # one hot pixel: unclipped min-max normalization dims every spot
    tifffile.imwrite(bucket / "hot.tif", image)
    key = frontend_submit(redis_client, "spot", "hot.tif", "hot.tif", {})
    run_batch(spot_settings(redis_server, spot_server, bucket, POLARIS_CLIP=str(clip).lower()))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    recall, _ = recall_precision(result_spots(job)["hot_0.npy"], truth)
    assert (recall >= 0.9) if clip else (recall < 0.1), recall
