"""The tracking stand-ins over real gRPC: upstream's names, signatures and outputs.

Signatures from deepcell-tf ``deepcell/model_zoo/tracking.py`` (GNNTrackingModel's
neighborhood encoder and inference branch) at f1839a4eac03df1ceb17f28390bb7a1aa3f8dac8; the
names and versions the Kiosk asks for from kiosk-redis-consumer ``redis_consumer/settings.py``
at a183af9c66b2f3b278d600619ab28b24aa84bac6 (NuclearTrackingInf:6, NuclearTrackingNE:6) and
kiosk-console ``conf/helmfile.d/0250.caliban-consumer.yaml`` (version 75).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from kiosk_model_server import ModelServer
from kiosk_model_server.models import build_model
from kiosk_model_server.synthetic import make_timelapse
from kiosk_worker import tracking_features
from kiosk_worker.tfs.client import InvalidModelInput, TFServingClient


@pytest.fixture()
def tracking_client() -> Iterator[TFServingClient]:
    server = ModelServer([build_model("NuclearTrackingInf", versions=(75,)),
                          build_model("NuclearTrackingNE", versions=(75,))]).start()
    tfs = TFServingClient("127.0.0.1", server.port, timeout=10.0, max_retries=1, backoff=0.01)
    yield tfs
    tfs.close()
    server.stop(grace=0)


def test_signatures_are_upstreams(tracking_client: TFServingClient) -> None:
    for version in (6, 75):
        enc = tracking_client.get_model_metadata("NuclearTrackingNE", version)
        assert {k: (v["dtype"], v["shape"]) for k, v in enc["inputs"].items()} == {
            "encoder_app_input": ("DT_FLOAT", [-1, -1, 32, 32, 1]),
            "encoder_morph_input": ("DT_FLOAT", [-1, -1, 3]),
            "encoder_centroid_input": ("DT_FLOAT", [-1, -1, 2]),
            "encoder_adj_input": ("DT_FLOAT", [-1, -1, -1]),
        }
        # The Kiosk reads the second output by name (embedding_axis=1): the embeddings.
        assert sorted(enc["outputs"]) == ["encoder_centroid_input", "relu_nef"]
        assert enc["outputs"]["relu_nef"]["shape"] == [-1, -1, 64]
        inf = tracking_client.get_model_metadata("NuclearTrackingInf", version)
        assert {k: v["shape"] for k, v in inf["inputs"].items()} == {
            "current_embeddings": [-1, -1, -1, 64], "current_centroids": [-1, -1, -1, 2],
            "future_embeddings": [-1, 1, -1, 64], "future_centroids": [-1, 1, -1, 2],
        }
        assert {k: v["shape"] for k, v in inf["outputs"].items()} == {"tracking_decoder": [-1, 1, -1, -1, 3]}


def _encoder_inputs(normalize: bool = True) -> dict[str, np.ndarray]:
    stack, labels, _ = make_timelapse(frames=2, shape=(64, 64), n_cells=4, seed=2)
    frames, max_cells = tracking_features.movie_features(stack[..., None], labels)
    inputs = tracking_features.padded(frames, 0, 2, max_cells, 50)
    if not normalize:
        inputs["encoder_adj_input"] = np.stack([tracking_features.adjacency(c, 50)
                                                for c in inputs["encoder_centroid_input"]])
    return inputs


def test_encoder_embeds_cells_and_degrades_on_unnormalized_adjacency(tracking_client: TFServingClient) -> None:
    inputs = _encoder_inputs()
    out = tracking_client.predict("NuclearTrackingNE", 75, inputs)
    emb = out["relu_nef"]
    real = inputs["encoder_morph_input"][..., 0] > 0
    assert emb.shape == real.shape + (64,)
    np.testing.assert_allclose(emb[..., 0][real], np.sqrt(inputs["encoder_morph_input"][..., 0][real]), rtol=1e-5)
    assert not emb[~real].any()
    np.testing.assert_array_equal(out["encoder_centroid_input"], inputs["encoder_centroid_input"])
    # A raw 0/1 adjacency (the normalisation skipped) is not what the model was trained on.
    raw = tracking_client.predict("NuclearTrackingNE", 75, _encoder_inputs(normalize=False))
    assert not raw["relu_nef"].any()


def test_inference_scores_same_cell_and_daughter(tracking_client: TFServingClient) -> None:
    emb = np.zeros((1, 2, 1, 64), np.float32)
    emb[..., 0] = 10.0  # area 100
    cent = np.full((1, 2, 1, 2), 20.0, np.float32)
    fut_e = np.zeros((1, 1, 3, 64), np.float32)
    fut_e[0, 0, :, 0] = [10.0, np.sqrt(50.0), 10.0]  # same size, half the area, same size far away
    fut_c = np.array([[[[20.5, 20.0], [24.0, 20.0], [60.0, 60.0]]]], np.float32)
    out = tracking_client.predict("NuclearTrackingInf", 75, {
        "current_embeddings": emb, "current_centroids": cent, "future_embeddings": fut_e,
        "future_centroids": fut_c})["tracking_decoder"]
    assert out.shape == (1, 1, 1, 3, 3)
    p = out[0, 0, 0]
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert p[0, 0] > 0.9 and p[1, 2] > 0.9 and p[2, 1] > 0.99
    with pytest.raises(InvalidModelInput):
        tracking_client.predict("NuclearTrackingInf", 75, {
            "current_embeddings": emb, "current_centroids": cent, "future_embeddings": fut_e[:, :, :, :32],
            "future_centroids": fut_c})
