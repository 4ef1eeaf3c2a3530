"""kiosk-model-server: models, synthetic data, upstream client compatibility, CLI."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import linear_sum_assignment
from tensorflow_serving.apis import get_model_metadata_pb2 as tf_md
from tensorflow_serving.apis import get_model_status_pb2 as tf_st
from tensorflow_serving.apis import model_service_pb2_grpc as tf_ms_grpc
from tensorflow_serving.apis import predict_pb2 as tf_predict
from tensorflow_serving.apis import prediction_service_pb2_grpc as tf_ps_grpc

from harness.ports import free_port
from kiosk_model_server import ModelServer
from kiosk_model_server.models import segment_frame
from kiosk_model_server.synthetic import REGIMES, as_regime, make_cells, make_timelapse
from kiosk_worker.pipeline import histogram_normalization
from kiosk_worker.tfs.client import InvalidModelInput, TFServingClient
from kiosk_worker.tfs.protos import get_model_status_pb2, model_service_pb2_grpc


def deep_watershed(foreground: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The worker's own post-processing (deepcell-toolbox's defaults) on one frame."""
    from kiosk_worker.postprocess import deep_watershed as upstream_watershed

    return upstream_watershed(inner, foreground)


def matched_iou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean IoU of ground-truth cells under an optimal one-to-one matching (unmatched = 0)."""
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    inter = np.bincount(t_inv.ravel() * len(p_ids) + p_inv.ravel(),
                        minlength=len(t_ids) * len(p_ids)).reshape(len(t_ids), len(p_ids))
    union = inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter
    iou = (inter / np.maximum(union, 1))[t_ids > 0][:, p_ids > 0]
    rows, cols = linear_sum_assignment(-iou)
    scores = np.zeros(iou.shape[0])
    scores[rows] = iou[rows, cols]
    return float(scores.mean())


def normalized(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W, 1) as the worker's pipeline sends it (deepcell histogram normalization)."""
    return histogram_normalization(image[None, ..., None])


def _touching_pairs(labels: np.ndarray) -> int:
    pairs = np.concatenate([
        np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()]),
        np.stack([labels[:-1].ravel(), labels[1:].ravel()])], axis=1)
    pairs = pairs[:, (pairs[0] != pairs[1]) & (pairs[0] > 0) & (pairs[1] > 0)]
    return len({tuple(sorted(p)) for p in pairs.T.tolist()})


# -- synthetic data ------------------------------------------------------

def test_make_cells_is_deterministic_with_ground_truth() -> None:
    image, labels = make_cells((256, 256), n_cells=20, seed=7)
    again, labels_again = make_cells((256, 256), n_cells=20, seed=7)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert image.dtype == np.float32 and labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == list(range(21))
    assert not np.array_equal(make_cells(seed=8)[1], labels)
    inside = labels > 0
    assert image[inside].mean() > 3 * image[~inside].mean()


def test_touching_option() -> None:
    assert _touching_pairs(make_cells(seed=3, touching=True)[1]) >= 3
    assert _touching_pairs(make_cells(seed=3, touching=False)[1]) == 0


def test_make_timelapse_lineage() -> None:
    stack, labels, lineage = make_timelapse(frames=12, shape=(128, 128), n_cells=8, seed=1)
    assert stack.shape == labels.shape == (12, 128, 128) and stack.dtype == np.float32
    again = make_timelapse(frames=12, shape=(128, 128), n_cells=8, seed=1)
    np.testing.assert_array_equal(labels, again[1])
    for t in range(12):
        present = set(np.unique(labels[t]).tolist()) - {0}
        assert present == {k for k, v in lineage.items() if t in v["frames"]}
    dividers = [v for v in lineage.values() if v["daughters"]]
    assert dividers, "expected at least one division"
    for parent in dividers:
        assert parent["frames"][-1] == parent["frame_div"] - 1
        for d in parent["daughters"]:
            assert lineage[d]["parent"] == parent["label"]
            assert lineage[d]["frames"][0] == parent["frame_div"]
    for t in range(1, 12):  # cells move a little: consecutive overlap stays high
        for label in set(np.unique(labels[t]).tolist()) & set(np.unique(labels[t - 1]).tolist()) - {0}:
            a, b = labels[t - 1] == label, labels[t] == label
            assert (a & b).sum() / (a | b).sum() > 0.5


# -- segmentation over real gRPC ----------------------------------------

@pytest.mark.parametrize(("shape", "n_cells", "seed"), [
    ((256, 256), 20, 0), ((256, 256), 40, 1), ((128, 192), 10, 2), ((512, 512), 60, 3)])
def test_segmentation_recovers_synthetic_cells(client: TFServingClient, shape, n_cells, seed) -> None:
    image, truth = make_cells(shape, n_cells=n_cells, seed=seed)
    out = client.predict("segmentation", 1, {"image": normalized(image)})
    pred = deep_watershed(out["foreground"][0, ..., 0], out["inner_distance"][0, ..., 0])
    assert matched_iou(truth, pred) >= 0.8


def test_segmentation_is_a_real_model(client: TFServingClient) -> None:
    """Guard against a vacuous pass: an empty prediction or a single blob scores low."""
    image, truth = make_cells(seed=0)
    assert matched_iou(truth, np.zeros_like(truth)) == 0.0
    assert matched_iou(truth, (truth > 0).astype(np.int32)) < 0.2
    out = client.predict("null", 1, {"image": image[None, ..., None]})
    assert not out["foreground"].any() and not out["inner_distance"].any()


def test_mesmer_batch_two_channels_and_8bit_intensities(client: TFServingClient) -> None:
    (a, ta), (b, tb) = make_cells(seed=4), make_cells(seed=5)
    batch = np.stack([np.stack([a, np.zeros_like(a)], -1),
                      np.stack([np.clip(b * 255, 0, 255).round(), np.ones_like(b)], -1)])
    out = client.predict("mesmer", 1, {"image": histogram_normalization(batch)})
    for i, truth in enumerate((ta, tb)):
        pred = deep_watershed(out["foreground"][i, ..., 0], out["inner_distance"][i, ..., 0])
        assert matched_iou(truth, pred) >= 0.8


def test_fixed_tile_size() -> None:
    with ModelServer(["segmentation"], tile=128) as server:
        tfs = TFServingClient("127.0.0.1", server.port, max_retries=0)
        meta = tfs.get_model_metadata("segmentation", 1)
        assert meta["inputs"]["image"]["shape"] == [-1, 128, 128, 1]
        assert meta["outputs"]["foreground"]["shape"] == [-1, 128, 128, 1]
        image, truth = make_cells((256, 256), n_cells=20, seed=6)
        image = normalized(image)[0, ..., 0]
        with pytest.raises(InvalidModelInput, match=r"\[-1, 128, 128, 1\]"):
            tfs.predict("segmentation", 1, {"image": image[None, ..., None]})
        tiles = image.reshape(2, 128, 2, 128).transpose(0, 2, 1, 3).reshape(4, 128, 128, 1)
        out = tfs.predict("segmentation", 1, {"image": tiles})
        stitched = {k: v.reshape(2, 2, 128, 128).transpose(0, 2, 1, 3).reshape(256, 256)
                    for k, v in out.items()}
        pred = deep_watershed(stitched["foreground"], stitched["inner_distance"])
        assert matched_iou(truth, pred) >= 0.8
        tfs.close()


@pytest.mark.parametrize("regime", [r for r in REGIMES if r != "float"])
def test_stand_in_fails_without_the_pipelines_normalization(regime: str) -> None:
    """Like a real DeepCell model, the stand-in finds nothing in raw intensities: a worker that
    skips histogram normalization fails the end-to-end tests. (Raw floats already in 0..1 are
    the one regime it cannot tell apart by their statistics.)"""
    image, truth = make_cells((256, 256), 20, seed=30)
    raw = as_regime(image, truth, regime, seed=30).astype(np.float32)
    fg, inner = segment_frame(raw)
    assert not fg.any() and not inner.any()
    assert deep_watershed(fg, inner).max() == 0
    fg, inner = segment_frame(normalized(raw)[0, ..., 0])
    assert matched_iou(truth, deep_watershed(fg, inner)) >= 0.8


@pytest.mark.parametrize("radius", [34.0, 40.0])
def test_stand_in_fails_at_the_wrong_resolution(radius: float) -> None:
    """Cells far larger than at the model's resolution (a missing resize by a scale < 1) give
    nothing; brought to the model's resolution, the same cells are found. (Cells a few pixels
    across are still found, so a missing resize by a scale > 1 is not caught this way.)"""
    from skimage.transform import resize

    size = int(radius * 16)
    image, truth = make_cells((size, size), 12, seed=31, radius=radius)
    fg, inner = segment_frame(normalized(image)[0, ..., 0])
    assert deep_watershed(fg, inner).max() == 0
    factor = 12.0 / radius
    shape = (int(size * factor), int(size * factor))
    resized = resize(image, shape, order=1, preserve_range=True).astype(np.float32)
    fg, inner = segment_frame(normalized(resized)[0, ..., 0])
    assert deep_watershed(fg, inner).max() >= 8


# -- TF Serving's own client against our server ---------------------------

def test_upstream_client_against_our_server(model_server: ModelServer) -> None:
    channel = grpc.insecure_channel(model_server.address)
    stub = tf_ps_grpc.PredictionServiceStub(channel)
    image, truth = make_cells(seed=2)
    image = normalized(image)[0, ..., 0]
    req = tf_predict.PredictRequest()
    req.model_spec.name = "segmentation"
    req.model_spec.version.value = 2
    req.model_spec.signature_name = "serving_default"
    req.inputs["image"].CopyFrom(tf.make_tensor_proto(image[None, ..., None]))
    resp = stub.Predict(req, timeout=30)
    assert resp.model_spec.name == "segmentation" and resp.model_spec.version.value == 2
    fg = tf.make_ndarray(resp.outputs["foreground"])[0, ..., 0]
    inner = tf.make_ndarray(resp.outputs["inner_distance"])[0, ..., 0]
    assert matched_iou(truth, deep_watershed(fg, inner)) >= 0.8

    md_req = tf_md.GetModelMetadataRequest(metadata_field=["signature_def"])
    md_req.model_spec.name = "mesmer"
    md = stub.GetModelMetadata(md_req, timeout=10)
    sig_map = tf_md.SignatureDefMap()
    assert md.metadata["signature_def"].Unpack(sig_map)
    sig = sig_map.signature_def["serving_default"]
    assert [d.size for d in sig.inputs["image"].tensor_shape.dim] == [-1, -1, -1, 2]
    assert sig.inputs["image"].dtype == tf.float32.as_datatype_enum

    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelMetadata(tf_md.GetModelMetadataRequest(model_spec=md_req.model_spec), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    status = tf_ms_grpc.ModelServiceStub(channel).GetModelStatus(
        tf_st.GetModelStatusRequest(model_spec=md_req.model_spec), timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, tf_st.ModelVersionStatus.AVAILABLE), (2, tf_st.ModelVersionStatus.AVAILABLE)]
    channel.close()


def test_model_status_with_our_stub(model_server: ModelServer) -> None:
    channel = grpc.insecure_channel(model_server.address)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "null"
    req.model_spec.version.value = 2
    resp = stub.GetModelStatus(req, timeout=10)
    assert [(s.version, s.state) for s in resp.model_version_status] == [(2, 30)]
    req.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelStatus(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in info.value.details()
    channel.close()


# -- command line ---------------------------------------------------------

def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=deadline - time.monotonic()):
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    raise AssertionError(f"no output from kiosk-model-server within {timeout}s")


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiosk_model_server", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_serves_injects_faults_and_stops_on_sigterm() -> None:
    proc = _cli("--port", "0", "--models", "seg=segmentation,null", "--versions", "1,2",
                "--tile", "64", "--fail-next", "1", "--fail-code", "UNAVAILABLE",
                "--latency-ms", "5", "--log-level", "WARNING")
    try:
        line = _read_line(proc, 30)
        assert line.startswith("kiosk-model-server listening on 127.0.0.1:"), line
        port = int(line.split()[3].rsplit(":", 1)[1])
        tfs = TFServingClient("127.0.0.1", port, timeout=10, max_retries=2, backoff=0.01)
        meta = tfs.get_model_metadata("seg")  # first call hits the injected UNAVAILABLE
        assert meta["model_version"] == 2 and meta["inputs"]["image"]["shape"] == [-1, 64, 64, 1]
        tfs.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "x=unknownkind"], "unknown model kind"),
    (["--fail-code", "NOPE"], "unknown gRPC status code"),
    (["--versions", "0"], "positive"),
])
def test_cli_rejects_bad_options(args: list[str], message: str) -> None:
    proc = _cli("--port", "0", *args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and message in err


def test_cli_port_in_use() -> None:
    port = free_port()
    with ModelServer(["null"], port=port):
        proc = _cli("--port", str(port), "--models", "null")
        _, err = proc.communicate(timeout=30)
    # gRPC core may log its own line first; ours is the last one.
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (
        f"kiosk-model-server: cannot listen on 127.0.0.1:{port} (address in use or not local)")
