"""The deepcell application pipeline around the model call (kiosk_worker.pipeline), end to end
through the worker and the stand-in model over gRPC, for the images microscopes write."""

from __future__ import annotations

import numpy as np
import pytest
from workerkit import mean_matched_iou, result_labels, run_batch, save_tiff, settings_for, submit

import kiosk_protocol as protocol
from kiosk_model_server.synthetic import REGIMES, as_regime, make_cells
from kiosk_protocol.settings import SettingsError, load_settings
from kiosk_worker import pipeline, tiling
from kiosk_worker.consumers import segmentation
from kiosk_worker.consumers.segmentation import object_count
from kiosk_worker.postprocess import WatershedParams


def run_one(redis_client, redis_server, server, bucket, image, name="cells.tif", **fields):
    key = submit(redis_client, save_tiff(bucket, name, image), **fields)
    run_batch(settings_for(redis_server, server, bucket))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    (labels,) = result_labels(bucket, job)
    # The job hash says how many objects the result holds; an image with cells never gives none.
    assert int(job["object_count"]) == len(np.unique(labels[labels > 0])) > 0, job
    return job, labels


@pytest.mark.parametrize("regime", REGIMES)
def test_every_intensity_regime_is_segmented(regime, redis_client, redis_server, model_server, bucket):
    image, truth = make_cells((256, 256), 20, seed=21)
    raw = as_regime(image, truth, regime, seed=21)
    _, labels = run_one(redis_client, redis_server, model_server, bucket, raw)
    assert labels.shape == truth.shape
    assert mean_matched_iou(labels, truth) >= 0.8


@pytest.mark.parametrize("regime", REGIMES)
def test_a_worker_that_skips_normalization_fails(regime, redis_client, redis_server, model_server, bucket):
    """APPLICATION=none sends the raw pixels: the stand-in, like a real model, gives unusable
    output (no cells for every regime but ``float``; for raw floats already spanning 0..1,
    which histogram normalization changes little, cells too poor for the IoU bar)."""
    image, truth = make_cells((256, 256), 20, seed=21)
    raw = as_regime(image, truth, regime, seed=21)
    key = submit(redis_client, save_tiff(bucket, "raw.tif", raw))
    run_batch(settings_for(redis_server, model_server, bucket, APPLICATION="none"))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    (labels,) = result_labels(bucket, job)
    if regime == "float":
        assert mean_matched_iou(labels, truth) < 0.8
    else:
        assert int(job["object_count"]) == 0 and not labels.any()


def test_the_issue_image_sixteen_bit_round_cells_at_1000(redis_client, redis_server, model_server, bucket):
    """12 round cells at intensity 1,000 on a background of 0: was `done` with 0 cells."""
    _, truth = make_cells((256, 256), 12, seed=22, touching=False, radius=14)
    image = np.where(truth > 0, 1000, 0).astype(np.uint16)
    job, labels = run_one(redis_client, redis_server, model_server, bucket, image)
    assert int(job["object_count"]) == len(np.unique(truth[truth > 0])) == 12
    assert mean_matched_iou(labels, truth) >= 0.8


# Cells of radius 8 (scale 2: 4 px in the image), 12 and 16 (scale 0.5: 32 px in the image)
# pixels at the model's resolution. At scale 0.5 the cells are too large for the stand-in at the
# image's own resolution, so skipping the resize fails (tests/tfs test_stand_in_fails_at_the_
# wrong_resolution).
@pytest.mark.parametrize("scale, model_radius", [(0.5, 16), (1, 12), (2, 8)])
def test_scale_brings_cells_to_the_models_resolution(scale, model_radius, redis_client, redis_server,
                                                       model_server, bucket):
    size = int(round(128 / scale))
    image, truth = make_cells((size, size), 12, seed=23, radius=model_radius / scale)
    raw = as_regime(image, truth, "uint16", seed=23)
    job, labels = run_one(redis_client, redis_server, model_server, bucket, raw, scale=f"{scale:g}")
    assert labels.shape == truth.shape
    assert mean_matched_iou(labels, truth) >= 0.8


def test_tiled_and_untiled_give_the_same_labels(redis_client, redis_server, model_server,
                                                tiled_model_server, bucket):
    """A 64x64 model over a 300x260 image: cells on tile borders are not cut by the blending."""
    image, truth = make_cells((300, 260), 40, seed=24, radius=11)
    raw = as_regime(image, truth, "uint16-low", seed=24)
    whole_job, whole = run_one(redis_client, redis_server, model_server, bucket, raw, name="whole.tif")
    redis_client.delete(protocol.metadata_key("segmentation", "1"))  # the other server's signature
    start = len(tiled_model_server.predicted)
    tiled_job, tiled = run_one(redis_client, redis_server, tiled_model_server, bucket, raw, name="tiled.tif")
    shapes = {shapes["image"][1:] for _, _, shapes in list(tiled_model_server.predicted)[start:]}
    assert shapes == {(64, 64, 1)}, shapes  # it was tiled
    assert mean_matched_iou(whole, truth) >= 0.8 and mean_matched_iou(tiled, truth) >= 0.8
    assert abs(int(whole_job["object_count"]) - int(tiled_job["object_count"])) <= 1
    assert mean_matched_iou(tiled, whole) >= 0.95


# -- the pipeline's parts ----------------------------------------------------------------------
def test_histogram_normalization_is_deepcells():
    rng = np.random.default_rng(0)
    batch = np.stack([rng.integers(0, 4000, (64, 80)), np.full((64, 80), 7)])[..., None].astype(np.uint16)
    out = pipeline.histogram_normalization(batch)
    assert out.dtype == np.float32 and out.shape == batch.shape
    assert out[0].min() >= 0 and out[0].max() == pytest.approx(1.0, abs=1e-3)
    assert (out[1] == 0).all()  # a constant frame becomes zeros, as upstream
    # Intensity-invariant: the same picture at another bit depth normalizes the same way.
    again = pipeline.histogram_normalization(batch.astype(np.float32) / 4000.0)
    assert np.allclose(out, again, atol=1e-3)


def test_percentile_threshold_clips_bright_spots_of_each_channel():
    image = np.zeros((1, 100, 100, 2), np.float32)
    image[0, ..., 0] = np.arange(10000).reshape(100, 100)
    image[0, 0, 0, 0] = 0
    out = pipeline.percentile_threshold(image, 99.0)
    top = np.percentile(np.arange(1, 10000), 99.0)
    assert out[..., 0].max() == pytest.approx(top)
    assert (out[..., 1] == 0).all()
    assert np.array_equal(out[0, :50, :, 0], image[0, :50, :, 0])


def test_application_by_model_name_and_settings():
    auto = load_settings({})
    assert pipeline.application_for("NuclearSegmentation", auto).family == "nuclear"
    assert pipeline.application_for("PhaseCytoSegmentation", auto).family == "cytoplasm"
    assert pipeline.application_for("CytoplasmSegmentation", auto).family == "cytoplasm"
    assert pipeline.application_for("MultiplexSegmentation", auto).family == "mesmer"
    assert pipeline.application_for("my-model", auto).family == "nuclear"
    custom = load_settings({"APPLICATION": "none", "APPLICATION_MODELS": "seg=cytoplasm, other=Mesmer"})
    assert pipeline.application_for("seg", custom).family == "cytoplasm"
    assert pipeline.application_for("other", custom).family == "mesmer"
    assert pipeline.application_for("NuclearSegmentation", custom).family == "none"
    assert pipeline.APPLICATIONS["nuclear"].model_mpp == 0.65
    assert pipeline.APPLICATIONS["mesmer"].model_mpp == 0.5
    for bad in ({"APPLICATION": "nucleus"}, {"APPLICATION_MODELS": "seg"},
                {"APPLICATION_MODELS": "seg=auto"}):
        with pytest.raises(SettingsError):
            load_settings(bad)


def test_postprocess_kwargs_per_application_and_pool_overrides():
    mesmer = pipeline.APPLICATIONS["mesmer"]
    params = mesmer.watershed(WatershedParams())
    assert (params.radius, params.maxima_threshold, params.interior_threshold) == (2, 0.075, 0.2)
    assert params.small_objects_threshold == 15 and params.fill_holes_threshold == 15
    assert mesmer.watershed(WatershedParams(radius=5)).radius == 5  # a pool's POSTPROCESS_RADIUS
    assert pipeline.APPLICATIONS["nuclear"].watershed(WatershedParams()) == WatershedParams()


def test_untile_blends_seams_away():
    """Tiles whose predictions disagree by a constant offset are blended smoothly, whereas the
    hard seam of ``stitch`` jumps by the whole offset."""
    image = np.zeros((1, 150, 150, 1), np.float32)
    tiles, plan = tiling.tile_image(image, 64, 64, 0.25)
    tiles = tiles + np.arange(plan.count, dtype=np.float32)[:, None, None, None]
    blended, hard = tiling.untile(tiles, plan)[0, ..., 0], tiling.stitch(tiles, plan)[0, ..., 0]
    assert np.abs(np.diff(hard, axis=1)).max() >= 1.0
    assert np.abs(np.diff(blended, axis=1)).max() < 0.5
    # Where tiles agree, untiling gives the value back exactly.
    ramp = np.linspace(0, 1, 150 * 150, dtype=np.float32).reshape(1, 150, 150, 1)
    tiles, plan = tiling.tile_image(ramp, 64, 64, 0.25)
    assert np.allclose(tiling.untile(tiles, plan), ramp, atol=1e-6)


def test_object_count_counts_labels_per_frame_and_channel():
    labels = np.zeros((2, 10, 10, 2), np.int32)
    labels[0, :2, :2, 0], labels[0, 5:, 5:, 0] = 1, 4
    labels[1, :3, :3, 1] = 1
    assert object_count(labels) == 3
    assert object_count(np.zeros((1, 4, 4, 1), np.int32)) == 0


@pytest.mark.parametrize("min_size, expected", [(32, 2), (128, 32)])
def test_tf_min_model_size_sets_the_request_batch(min_size, expected, redis_client, redis_server,
                                                  tiled_model_server, bucket):
    """Upstream's GrpcModelWrapper.get_batch_size: TF_MAX_BATCH_SIZE // ((64 / TF_MIN_MODEL_SIZE)
    ** 2 * channels) tiles per request for a 64x64 model: 8 // 4 = 2 at 32, 8 // 0.25 = 32 at 128
    (capped at TF_MAX_BATCH_SIZE)."""
    image, truth = make_cells((300, 260), 40, seed=25, radius=11)
    key = submit(redis_client, save_tiff(bucket, "b.tif", as_regime(image, truth, "uint8", seed=25)))
    redis_client.delete(protocol.metadata_key("segmentation", "1"))
    start = len(tiled_model_server.predicted)
    run_batch(settings_for(redis_server, tiled_model_server, bucket, TF_MAX_BATCH_SIZE=8,
                           TF_MIN_MODEL_SIZE=min_size))
    job = redis_client.hgetall(key)
    assert job["status"] == "done", job
    sizes = [shapes["image"][0] for _, _, shapes in list(tiled_model_server.predicted)[start:]]
    # Never more than TF_MAX_BATCH_SIZE per request (the base consumer's cap).
    assert max(sizes) == min(expected, 8, sum(sizes)) and sum(sizes) > 8
    (labels,) = result_labels(bucket, job)
    assert mean_matched_iou(labels, truth) >= 0.8
    assert segmentation.batch_size([-1, 64, 64, 1], 8, min_size) == expected
    assert segmentation.batch_size([-1, -1, -1, 2], 64, 128) == 32
