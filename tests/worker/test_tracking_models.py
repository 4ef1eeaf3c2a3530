"""Model-driven tracking, pure: features, the assignment and the lineage, with the stand-in
models called in process (the gRPC path is in test_tracking_consumer).

What upstream does is read from deepcell-tracking ``deepcell_tracking/tracking.py`` and
``deepcell_tracking/utils.py`` at 130bcd845cdf066e98baab80b5163bf86c3c346b (CellTracker's
cost matrix, _update_tracks, _get_parent; get_image_features, normalize_adj_matrix), called
by kiosk-redis-consumer ``redis_consumer/consumers/caliban_consumer.py`` at
a183af9c66b2f3b278d600619ab28b24aa84bac6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kiosk_model_server.synthetic import make_timelapse
from kiosk_model_server.tracking_model import NeighborhoodEncoderModel, TrackingInferenceModel
from kiosk_worker import tracking_caliban, tracking_features
from kiosk_worker.tracking import TrackingResult, TrackingTooLarge
from kiosk_worker.tracking_caliban import CalibanParams, solve_assignment, track_with_models

ENCODER = NeighborhoodEncoderModel("NuclearTrackingNE")
INFERENCE = TrackingInferenceModel("NuclearTrackingInf")
CALLS: list[str] = []


def encoder(inputs: dict[str, np.ndarray]) -> np.ndarray:
    CALLS.append("encoder")
    ENCODER.check(inputs)
    out = ENCODER.run(inputs)
    return out[sorted(out)[1]]  # the Kiosk's embedding_axis=1


def inference(inputs: dict[str, np.ndarray]) -> np.ndarray:
    CALLS.append("inference")
    INFERENCE.check(inputs)
    return INFERENCE.run(inputs)["tracking_decoder"]


def to_truth(result: TrackingResult, truth: np.ndarray) -> dict[int, int]:
    return {cid: int(np.bincount(truth[result.labels == cid]).argmax()) for cid in result.lineage}


def check_against_truth(result: TrackingResult, truth: np.ndarray, truth_lineage: dict[int, Any]) -> None:
    """One tracked id per true cell and back, same frames, parents and daughters."""
    mapping = to_truth(result, truth)
    assert sorted(mapping.values()) == sorted(truth_lineage), mapping
    for cid, info in result.lineage.items():
        true = truth_lineage[mapping[cid]]
        assert info["frames"] == true["frames"], (cid, info, true)
        assert np.array_equal(result.labels == cid, truth == mapping[cid])
        assert sorted(mapping[d] for d in info["daughters"]) == sorted(true["daughters"])
        assert (info["parent"] and mapping[info["parent"]]) == true["parent"]
        assert info["frame_div"] == true["frame_div"] and info["capped"] == bool(true["daughters"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tracks_and_divisions_of_the_truth(seed: int) -> None:
    stack, truth, truth_lineage = make_timelapse(frames=10, shape=(96, 96), n_cells=8, seed=seed)
    assert any(info["daughters"] for info in truth_lineage.values())
    result = track_with_models(stack, truth, encoder, inference)
    check_against_truth(result, truth, truth_lineage)
    assert result.divisions


def test_kiosk_console_parameters_and_fixed_crops() -> None:
    """DIVISION 0.01, MAX_DISTANCE 60 (kiosk-console's caliban release) and the fixed crop mode."""
    stack, truth, truth_lineage = make_timelapse(frames=8, shape=(96, 96), n_cells=8, seed=4)
    for params in (CalibanParams(distance_threshold=60, division=0.01),
                   CalibanParams(crop_mode="fixed")):
        check_against_truth(track_with_models(stack, truth, encoder, inference, params), truth, truth_lineage)


def test_missed_cell_keeps_its_track() -> None:
    """A cell the segmentation lost for a frame stays a candidate and is linked when it returns."""
    stack, truth, truth_lineage = make_timelapse(frames=6, shape=(96, 96), n_cells=6, seed=7, divisions=False)
    holey = truth.copy()
    holey[3][holey[3] == 2] = 0
    result = track_with_models(stack, holey, encoder, inference)
    cid = int(np.bincount(result.labels[0][truth[0] == 2]).argmax())
    assert result.lineage[cid]["frames"] == [0, 1, 2, 4, 5]
    assert len(result.lineage) == len(truth_lineage)


def test_skipped_adjacency_normalization_tracks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without D^-1/2 A D^-1/2 the encoder degrades: every cell of every frame starts a track."""
    stack, truth, _ = make_timelapse(frames=4, shape=(96, 96), n_cells=6, seed=1)
    monkeypatch.setattr(tracking_features, "normalize_adjacency", lambda adj, epsilon=0.0: adj)
    result = track_with_models(stack, truth, encoder, inference)
    cells = sum(len(np.unique(truth[t])) - 1 for t in range(len(truth)))
    assert len(result.lineage) == cells and not result.divisions


def test_wrong_morphology_tracks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Morphologies in another order (perimeter, area, ...) are not cells to the encoder."""
    stack, truth, _ = make_timelapse(frames=4, shape=(96, 96), n_cells=6, seed=1)
    real = tracking_features.frame_features

    def swapped(*args: Any, **kwargs: Any) -> tracking_features.FrameFeatures:
        f = real(*args, **kwargs)
        f.morphologies = f.morphologies[:, [1, 0, 2]]
        return f

    monkeypatch.setattr(tracking_features, "frame_features", swapped)
    result = track_with_models(stack, truth, encoder, inference)
    assert len(result.lineage) == sum(len(np.unique(truth[t])) - 1 for t in range(len(truth)))


def test_features_as_deepcell_tracking() -> None:
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 10:30] = 7
    labels[20:36, 30:46] = 3
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    f = tracking_features.frame_features(image, labels, appearance_dim=8)
    assert f.labels.tolist() == [3, 7]  # label order
    np.testing.assert_allclose(f.centroids, [[27.5, 37.5], [9.5, 19.5]])
    assert f.morphologies[:, 0].tolist() == [256, 200] and f.morphologies[0, 2] == 0  # a square
    assert f.appearances.shape == (2, 8, 8, 1)
    assert f.appearances[1].min() >= image[5, 10] and f.appearances[1].max() <= image[14, 29]
    # normalize_adj_matrix: D^-1/2 A D^-1/2 with degree + 1e-5
    adj = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], np.float32)
    d = np.diag((adj.sum(1) + 1e-5) ** -0.5)
    np.testing.assert_allclose(tracking_features.normalize_adjacency(adj), d @ adj @ d, rtol=1e-6)


def upstream_cost(links: np.ndarray, birth: float, death: float) -> np.ndarray:
    """deepcell-tracking's _build_cost_matrix, written out as it reads."""
    t, c = links.shape
    cost = np.zeros((t + c,) * 2)
    cost[:t, :c] = links
    cost[t:, :c] = np.diag([birth] * c) + np.ones((c, c)) - np.eye(c)
    cost[:t, c:] = death * np.eye(t) + np.ones((t, t)) - np.eye(t)
    cost[t:, c:] = links.T
    return cost


def test_assignment_is_upstreams_lap_and_the_sparse_one_agrees() -> None:
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for _ in range(20):
        links = rng.uniform(0.0, 1.0, size=(rng.integers(1, 9), rng.integers(1, 9))) ** 3
        rows, cols = linear_sum_assignment(upstream_cost(links, 0.99, 0.99))
        want = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if c < links.shape[1]]
        assert solve_assignment(links, 0.99, 0.99) == want
        dense_cost = upstream_cost(links, 0.99, 0.99)[rows, cols].sum()
        sparse = solve_assignment(links, 0.99, 0.99, dense_limit=0)
        linked = [(r, c) for r, c in sparse if r < links.shape[0]]
        got = (2 * sum(links[r, c] for r, c in linked) + 0.99 * (links.shape[0] - len(linked))
               + 0.99 * (links.shape[1] - len(linked)))
        assert got <= dense_cost + 1e-9
    # a link costs twice 1 - p_same: p_same 0.02 links, 0.005 does not (birth = death = 0.99)
    assert solve_assignment(np.array([[0.98]]), 0.99, 0.99) == [(0, 0)]
    assert solve_assignment(np.array([[0.995]]), 0.99, 0.99) == [(1, 0)]


def test_sparse_assignment_tracks_like_the_dense_one() -> None:
    stack, truth, truth_lineage = make_timelapse(frames=8, shape=(96, 96), n_cells=8, seed=2)
    result = track_with_models(stack, truth, encoder, inference, CalibanParams(dense_limit=0))
    check_against_truth(result, truth, truth_lineage)


def test_caps_before_any_model_call() -> None:
    stack, truth, _ = make_timelapse(frames=4, shape=(64, 64), n_cells=4, seed=1)
    CALLS.clear()
    with pytest.raises(TrackingTooLarge, match="MAX_CELLS_PER_FRAME"):
        track_with_models(stack, truth, encoder, inference, CalibanParams(max_cells=2))
    with pytest.raises(TrackingTooLarge, match="MAX_IMAGE_FRAMES"):
        track_with_models(stack, truth, encoder, inference, CalibanParams(max_frames=3))
    assert CALLS == []


def test_encoder_batches_frames_by_bytes() -> None:
    stack, truth, _ = make_timelapse(frames=5, shape=(64, 64), n_cells=4, seed=1)
    frames, max_cells = tracking_features.movie_features(stack[..., None], truth)
    CALLS.clear()
    emb = tracking_caliban.embed(frames, max_cells, encoder, 50, batch_bytes=1)
    assert CALLS == ["encoder"] * 5 and [len(e) for e in emb] == [len(f.labels) for f in frames]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_region_measures_are_regionprops(seed: int) -> None:
    """Area, centroid, perimeter, eccentricity and bounding box as deepcell-tracking reads them
    from skimage's regionprops, touching cells and a cell on the image edge included."""
    from skimage.measure import regionprops

    from kiosk_model_server.synthetic import make_cells

    _, lab = make_cells((128, 128), 25, seed=seed, touching=True)
    lab = lab.astype(np.int32)
    lab[0:5, 0:7] = 99
    ids, area, cent, per, ecc, boxes = tracking_features.region_measures(lab)
    props = regionprops(lab)
    assert [p.label for p in props] == ids.tolist()
    np.testing.assert_allclose(area, [p.area for p in props])
    np.testing.assert_allclose(cent, [p.centroid for p in props], rtol=1e-9)
    np.testing.assert_allclose(per, [p.perimeter for p in props], rtol=1e-9)
    np.testing.assert_allclose(ecc, [p.eccentricity for p in props], atol=1e-7)
    assert boxes == [tuple(slice(a, b) for a, b in zip(p.bbox[:2], p.bbox[2:], strict=True)) for p in props]
