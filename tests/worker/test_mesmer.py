"""The mesmer consumer end to end: real redis-server, the Mesmer stand-in (``MultiplexSegmentation:9``,
deepcell's Mesmer signature) over real gRPC, a file:// bucket, jobs written as the Kiosk frontend
writes them (``model_name=''``). Labels are compared with ``make_tissue``'s ground truth."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_frontend_jobs import frontend_submit
from workerkit import mean_matched_iou, result_labels, run_batch, settings_for

import kiosk_protocol as protocol
from kiosk_model_server import ModelServer
from kiosk_model_server.mesmer_model import make_tissue
from kiosk_model_server.models import build_model
from kiosk_protocol import zipjobs

QUEUE = "mesmer"


@pytest.fixture(scope="module")
def mesmer_server() -> Iterator[ModelServer]:
    server = ModelServer(models=[build_model("MultiplexSegmentation")]).start()
    yield server
    server.stop()


def mesmer_settings(redis_server, server: ModelServer, bucket: Path, **extra: object):
    return settings_for(redis_server, server, bucket, QUEUE=QUEUE, CONSUMER_TYPE="mesmer", **extra)


def upload(bucket: Path, name: str, image: np.ndarray) -> str:
    tifffile.imwrite(bucket / name, image, photometric="minisblack")
    return name


def one_line_reason(job: dict[str, str]) -> str:
    assert job["status"] == "failed", job
    assert job["reason"] and "\n" not in job["reason"] and "Traceback" not in job["reason"]
    return job["reason"]


@pytest.mark.parametrize("compartment", ["whole-cell", "nuclear", "both"])
def test_labels_match_the_ground_truth(compartment, redis_client, redis_server, mesmer_server, bucket):
    truths = {}
    for seed, shape, n in [(0, (256, 256), 20), (1, (160, 200), 12)]:
        image, cells, nuclei = make_tissue(shape, n, seed=seed)
        name = upload(bucket, f"tissue{seed}.tif", image)  # (H, W, 2): nuclear, membrane
        key = frontend_submit(redis_client, QUEUE, name, name,
                              {"dimensionOrder": "XYC", "selectedChannels": "0,1"})
        truths[key] = {"whole-cell": cells, "nuclear": nuclei}
    runner = run_batch(mesmer_settings(redis_server, mesmer_server, bucket,
                                       MESMER_COMPARTMENT=compartment))
    assert runner.stats.jobs_done == 2 and runner.stats.jobs_failed == 0
    wanted = ["whole-cell", "nuclear"] if compartment == "both" else [compartment]
    for key, truth in truths.items():
        job = redis_client.hgetall(key)
        assert job["status"] == "done", job
        stem = Path(job["original_name"]).stem
        with zipfile.ZipFile(job["output_url"]) as zf:
            assert sorted(zf.namelist()) == [f"{stem}_batch_0_feature_{k}.tif" for k in range(len(wanted))]
        labels = result_labels(bucket, job)
        for part, pred in zip(wanted, labels, strict=True):
            assert pred.dtype == np.int32 and pred.shape == truth[part].shape
            assert mean_matched_iou(pred, truth[part]) >= 0.8, (part, key)
        if compartment == "both":  # whole-cell first: each nucleus lies inside its cell, smaller
            assert (labels[0] > 0).sum() > 1.5 * (labels[1] > 0).sum()


def test_channels_pick_nuclear_and_membrane(redis_client, redis_server, mesmer_server, bucket):
    image, cells, nuclei = make_tissue((128, 160), 8, seed=3)
    noise = np.random.default_rng(0).uniform(0, 1, image.shape[:2]).astype(np.float32)
    shuffled = np.stack([image[..., 1], noise, image[..., 0]], axis=-1)  # membrane, junk, nuclear
    name = upload(bucket, "shuffled.tif", shuffled)
    key = frontend_submit(redis_client, QUEUE, name, name,
                          {"dimensionOrder": "XYC", "selectedChannels": "2,0"})
    run_batch(mesmer_settings(redis_server, mesmer_server, bucket, MESMER_COMPARTMENT="nuclear"))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    (labels,) = result_labels(bucket, job)
    assert mean_matched_iou(labels, nuclei) >= 0.8


def test_job_compartment_field_and_bad_values(redis_client, redis_server, mesmer_server, bucket):
    image, cells, _ = make_tissue((128, 128), 8, seed=4)
    name = upload(bucket, "c.tif", image)
    good = protocol.submit_job(redis_client, QUEUE, name, channels="0,1", compartment="whole-cell")
    bad = protocol.submit_job(redis_client, QUEUE, name, channels="0,1", compartment="cytoplasm")
    run_batch(mesmer_settings(redis_server, mesmer_server, bucket, MESMER_COMPARTMENT="nuclear"))
    job = redis_client.hgetall(good)
    assert job["status"] == "done", job
    (labels,) = result_labels(bucket, job)
    assert mean_matched_iou(labels, cells) >= 0.8
    assert "compartment 'cytoplasm'" in one_line_reason(redis_client.hgetall(bad))


def test_one_channel_image_fails_with_a_reason(redis_client, redis_server, mesmer_server, bucket):
    image, _, _ = make_tissue((96, 96), 4, seed=5)
    name = upload(bucket, "one.tif", image[..., 0])
    key = frontend_submit(redis_client, QUEUE, name, name, {})
    run_batch(mesmer_settings(redis_server, mesmer_server, bucket))
    assert "channel" in one_line_reason(redis_client.hgetall(key))


def test_mesmer_zip_goes_through_the_zip_parent(redis_client, redis_server, mesmer_server, bucket):
    members, truths = {}, {}
    for seed in (6, 7):
        image, cells, _ = make_tissue((128, 128), 8, seed=seed)
        buf = io.BytesIO()
        tifffile.imwrite(buf, image)
        members[f"t{seed}.tif"] = buf.getvalue()
        truths[f"t{seed}"] = cells
    (bucket / "uploads").mkdir()
    with zipfile.ZipFile(bucket / "uploads" / "tissues.zip", "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    parent = protocol.submit_job(redis_client, QUEUE, "uploads/tissues.zip", channels="0,1")
    assert parent.startswith("mesmer-zip:")
    zip_settings = settings_for(redis_server, mesmer_server, bucket, QUEUE="mesmer-zip",
                                CONSUMER_TYPE="zip")
    run_batch(zip_settings, max_jobs=1)  # fans out onto the mesmer queue
    children = zipjobs.split_keys(redis_client.hget(parent, "children"))
    assert len(children) == 2 and all(c.startswith("mesmer:") for c in children)
    run_batch(mesmer_settings(redis_server, mesmer_server, bucket))
    run_batch(zip_settings, max_jobs=1)  # collects
    job = redis_client.hgetall(parent)
    assert job["status"] == "done", job
    with zipfile.ZipFile(job["output_url"]) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".tif"))
        assert len(names) == 2, zf.namelist()
        for member in names:
            stem = next(s for s in truths if s in member)
            with zf.open(member) as fh:
                assert mean_matched_iou(tifffile.imread(fh), truths[stem]) >= 0.8


def test_fixed_size_model_is_tiled(redis_client, redis_server, bucket):
    server = ModelServer(models=[build_model("MultiplexSegmentation", tile=96)]).start()
    try:
        image, cells, nuclei = make_tissue((200, 150), 12, seed=8)
        name = upload(bucket, "big.tif", image)
        key = frontend_submit(redis_client, QUEUE, name, name, {"selectedChannels": "0,1"})
        run_batch(mesmer_settings(redis_server, server, bucket, MESMER_COMPARTMENT="both"))
        assert server.calls["Predict"] >= 1
    finally:
        server.stop()
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    whole, nuclear = result_labels(bucket, job)
    assert whole.shape == (200, 150)
    assert mean_matched_iou(whole, cells) >= 0.8 and mean_matched_iou(nuclear, nuclei) >= 0.8


@pytest.mark.parametrize("nuclear_peak, membrane_peak", [(255, 4095), (4000, 400)])
def test_channels_of_different_brightness(nuclear_peak, membrane_peak, redis_client, redis_server,
                                          mesmer_server, bucket):
    """A microscope gives each channel its own range (an 8-bit-range nuclear stain next to a
    12-bit-range membrane stain, or the nuclear stain 10x brighter): Mesmer's pre-processing
    normalizes each channel on its own, so both compartments are found."""
    image, cells, nuclei = make_tissue((192, 192), 14, seed=9)
    image = np.clip(image, 0.0, 1.0)  # the rendering's noise dips below zero; a camera's does not
    raw = np.stack([np.round(image[..., 0] * nuclear_peak), np.round(image[..., 1] * membrane_peak)],
                   axis=-1).astype(np.uint16)
    assert raw[..., 0].max() <= nuclear_peak and raw[..., 1].max() <= membrane_peak
    name = upload(bucket, f"bright{nuclear_peak}.tif", raw)
    key = frontend_submit(redis_client, QUEUE, name, name,
                          {"dimensionOrder": "XYC", "selectedChannels": "0,1"})
    run_batch(mesmer_settings(redis_server, mesmer_server, bucket, MESMER_COMPARTMENT="both"))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    whole, nuclear = result_labels(bucket, job)
    assert mean_matched_iou(whole, cells) >= 0.8
    assert mean_matched_iou(nuclear, nuclei) >= 0.8
