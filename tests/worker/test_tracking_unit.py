"""Tracking, pure: overlap, assignment, divisions, relabelling, lineage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiosk_model_server.synthetic import make_timelapse
from kiosk_worker import tracking
from kiosk_worker.tracking import TrackingParams, frame_overlap, track


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def frame(shape: tuple[int, int], cells: dict[int, tuple[float, float, float]]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int32)
    for label, (cy, cx, r) in cells.items():
        out[disk(shape, cy, cx, r)] = label
    return out


def id_consistency(tracked: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(share of true cells that keep one tracked id, share of tracked ids that follow one true cell)."""
    def purity(a: np.ndarray, b: np.ndarray) -> float:
        ok = total = 0
        for value in np.unique(a[a > 0]):
            ids = {int(np.bincount(b[t][a[t] == value]).argmax())
                   for t in range(a.shape[0]) if (a[t] == value).any()}
            total += 1
            ok += len(ids) == 1 and 0 not in ids
        return ok / max(total, 1)
    return purity(truth, tracked), purity(tracked, truth)


def mapped_divisions(result: tracking.TrackingResult, truth: np.ndarray) -> set[tuple[int, int, int]]:
    """Detected divisions in ground-truth ids (majority overlap of each track)."""
    to_truth = {}
    for cid in result.lineage:
        values = truth[result.labels == cid]
        to_truth[cid] = int(np.bincount(values).argmax())
    return {(to_truth[p], *sorted((to_truth[a], to_truth[b]))) for p, a, b in result.divisions}


def truth_divisions(lineage: dict) -> set[tuple[int, int, int]]:
    return {(k, *sorted(v["daughters"])) for k, v in lineage.items() if v["daughters"]}


def test_frame_overlap_counts_pixels() -> None:
    a = np.array([[1, 1, 0], [2, 2, 0], [0, 0, 0]])
    b = np.array([[5, 0, 0], [5, 5, 0], [0, 0, 7]])
    ov = frame_overlap(a, b)
    assert ov.prev_ids.tolist() == [1, 2] and ov.next_ids.tolist() == [5, 7]
    assert ov.inter.toarray().tolist() == [[1, 0], [2, 0]]
    assert ov.prev_area.tolist() == [2, 2] and ov.next_area.tolist() == [3, 1]
    assert ov.iou.toarray()[1, 0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        frame_overlap(a, b[:2])
    # huge label values take the sorting path and give the same answer
    big = frame_overlap(a * 10**9, b)
    assert big.prev_ids.tolist() == [10**9, 2 * 10**9] and big.inter.toarray().tolist() == ov.inter.toarray().tolist()


def test_moving_cells_keep_their_ids_even_when_labels_are_shuffled() -> None:
    shape = (60, 60)
    frames = []
    for t in range(5):
        cells = {1: (15 + t, 15 + t, 6), 2: (40, 40 - t, 7), 3: (15, 45, 5)}
        # the segmenter numbers cells arbitrarily in every frame
        perm = {1: [1, 3, 2, 9, 4][t], 2: [2, 1, 3, 4, 9][t], 3: [3, 2, 1, 1, 1][t]}
        frames.append(frame(shape, {perm[k]: v for k, v in cells.items()}))
    result = track(np.stack(frames))
    assert len(result.lineage) == 3
    for info in result.lineage.values():
        assert info["frames"] == [0, 1, 2, 3, 4]
        assert info["parent"] is None and info["daughters"] == [] and info["capped"] is False
    # id 1 is the first cell in frame 0's label order, and it stays on the same pixels' cell
    first = result.labels[0][15, 15]
    assert all(result.labels[t][15 + t, 15 + t] == first for t in range(5))
    assert result.labels.dtype == np.int32


def test_optimal_assignment_beats_greedy() -> None:
    """Greedy best-IoU-first would give B's cell to A; the optimum links both."""
    shape = (40, 80)
    prev = frame(shape, {1: (20, 20, 8), 2: (20, 34, 8)})
    nxt = frame(shape, {1: (20, 27, 8), 2: (20, 41, 8)})
    ov = frame_overlap(prev, nxt)
    links = tracking.match_cells(ov)
    assert sorted(links) == [(0, 0), (1, 1)]


def test_division_detected_and_lineage_built() -> None:
    shape = (60, 60)
    before = {1: (30, 30, 10), 2: (8, 8, 5)}
    after = {4: (30, 24, 7), 5: (30, 36, 7), 6: (8, 8, 5)}
    stack = np.stack([frame(shape, before), frame(shape, before), frame(shape, after), frame(shape, after)])
    result = track(stack)
    assert len(result.divisions) == 1
    parent, d1, d2 = result.divisions[0]
    lin = result.lineage
    assert lin[parent]["frames"] == [0, 1] and lin[parent]["capped"] is True
    assert lin[parent]["frame_div"] == 2
    for d in (d1, d2):
        assert lin[d]["parent"] == parent and lin[d]["frames"] == [2, 3] and not lin[d]["capped"]
    other = result.labels[0][8, 8]
    assert lin[other]["frames"] == [0, 1, 2, 3] and lin[other]["parent"] is None
    json.dumps(tracking.lineage_json(lin))  # serialisable


def test_new_cell_and_lost_cell() -> None:
    shape = (50, 50)
    stack = np.stack([
        frame(shape, {1: (10, 10, 5)}),
        frame(shape, {1: (10, 11, 5), 2: (35, 35, 5)}),
        frame(shape, {2: (35, 36, 5)}),
    ])
    result = track(stack)
    assert len(result.lineage) == 2
    a, b = result.lineage[1], result.lineage[2]
    assert a["frames"] == [0, 1] and a["capped"] is True and a["daughters"] == []
    assert b["frames"] == [1, 2] and b["capped"] is False and b["parent"] is None


def test_far_jump_is_not_linked() -> None:
    shape = (60, 60)
    stack = np.stack([frame(shape, {1: (10, 10, 5)}), frame(shape, {1: (45, 45, 5)})])
    result = track(stack, TrackingParams(min_iou=0.1))
    assert len(result.lineage) == 2


def test_neighbour_touching_a_cell_is_not_a_division() -> None:
    shape = (60, 60)
    stack = np.stack([
        frame(shape, {1: (30, 20, 8), 2: (30, 37, 8)}),
        frame(shape, {1: (30, 21, 8), 2: (30, 37, 8)}),
    ])
    result = track(stack)
    assert result.divisions == [] and len(result.lineage) == 2


def test_empty_frames_and_bad_input() -> None:
    result = track(np.zeros((3, 10, 10), dtype=np.int32))
    assert result.lineage == {} and not result.labels.any()
    with pytest.raises(ValueError, match="frames, height, width"):
        track(np.zeros((10, 10), dtype=np.int32))
    with pytest.raises(ValueError, match="integers"):
        track(np.zeros((2, 10, 10), dtype=np.float32))


@pytest.mark.parametrize("seed", range(8))
def test_ground_truth_timelapse_tracked_exactly(seed: int) -> None:
    _, truth, lineage = make_timelapse(frames=12, shape=(128, 128), n_cells=10, seed=seed)
    result = track(truth)
    assert mapped_divisions(result, truth) == truth_divisions(lineage)
    assert id_consistency(result.labels, truth) == (1.0, 1.0)
    assert len(result.lineage) == len(lineage)


def test_noisy_labels_still_track_well() -> None:
    """Eroded/dilated masks (segmentation noise): ids stay consistent, divisions found."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    found = expected = 0
    consistent = []
    for seed in range(6):
        _, truth, lineage = make_timelapse(frames=10, shape=(128, 128), n_cells=8, seed=seed)
        noisy = truth.copy()
        for t in range(truth.shape[0]):
            if rng.random() < 0.5:
                noisy[t] = np.where(ndimage.binary_erosion(truth[t] > 0, iterations=1), truth[t], 0)
            else:
                grown = ndimage.grey_dilation(truth[t], size=3)
                noisy[t] = np.where(truth[t] > 0, truth[t], grown)
        result = track(noisy)
        divisions = truth_divisions(lineage)
        expected += len(divisions)
        found += len(mapped_divisions(result, truth) & divisions)
        consistent.append(min(id_consistency(result.labels, truth)))
    assert found / expected >= 0.9
    assert np.mean(consistent) >= 0.95


def test_a_cell_missed_for_a_frame_keeps_its_track() -> None:
    """A segmentation miss (the cell is absent in frame 2) is bridged: same id, frames skip 2."""
    shape = (60, 60)
    stack = np.stack([
        frame(shape, {1: (15, 15, 6), 2: (40, 40, 6)}),
        frame(shape, {1: (15, 16, 6), 2: (40, 41, 6)}),
        frame(shape, {2: (40, 42, 6)}),
        frame(shape, {7: (15, 18, 6), 2: (40, 43, 6)}),
    ])
    result = track(stack)
    assert len(result.lineage) == 2
    first = result.lineage[1]
    assert first["frames"] == [0, 1, 3] and first["capped"] is False
    assert (result.labels[3][stack[3] == 7] == 1).all()
    # Without bridging it is a lost track plus a new one.
    assert len(track(stack, TrackingParams(max_gap=0)).lineage) == 3


def test_a_gap_longer_than_max_gap_starts_a_new_track() -> None:
    shape = (40, 40)
    present = frame(shape, {1: (20, 20, 6)})
    empty = np.zeros(shape, dtype=np.int32)
    stack = np.stack([present, empty, empty, empty, present])
    assert len(track(stack, TrackingParams(max_gap=2)).lineage) == 2
    bridged = track(stack, TrackingParams(max_gap=3))
    assert len(bridged.lineage) == 1 and bridged.lineage[1]["frames"] == [0, 4]


def test_a_bridged_cell_does_not_steal_a_cell_that_is_already_tracked() -> None:
    """A cell appearing where a lost one was is only linked to it if no live track continues there."""
    shape = (60, 60)
    stack = np.stack([
        frame(shape, {1: (20, 20, 6), 2: (20, 30, 6)}),
        frame(shape, {2: (20, 29, 6)}),
        frame(shape, {2: (20, 27, 6), 3: (20, 18, 6)}),
    ])
    result = track(stack)
    assert len(result.lineage) == 2
    assert set(np.unique(result.labels[2])) == {0, 1, 2}
    assert (result.labels[2][stack[2] == 2] == 2).all() and (result.labels[2][stack[2] == 3] == 1).all()


@pytest.mark.parametrize("seed", range(4))
def test_ground_truth_with_dropped_cells_tracked_exactly(seed: int) -> None:
    """The synthetic movies with a random cell blanked out in some frames (never the first
    or last of its track, never at a division): ids stay exact thanks to gap bridging."""
    _, truth, lineage = make_timelapse(frames=12, shape=(128, 128), n_cells=10, seed=seed)
    rng = np.random.default_rng(seed)
    dropped = truth.copy()
    division_frames = {t for info in lineage.values() for t in (info.get("frame_div"),) if t is not None}
    blanks = 0
    for t in range(1, truth.shape[0] - 1):
        if t in division_frames or t - 1 in division_frames or t + 1 in division_frames:
            continue
        ids = [int(v) for v in np.unique(truth[t]) if v and (truth[t - 1] == v).any() and (truth[t + 1] == v).any()]
        if ids and rng.random() < 0.6:
            dropped[t][truth[t] == rng.choice(ids)] = 0
            blanks += 1
    assert blanks >= 2
    result = track(dropped)
    assert id_consistency(result.labels, dropped) == (1.0, 1.0)
    assert len(result.lineage) == len(lineage)
    without = track(dropped, TrackingParams(max_gap=0))
    assert len(without.lineage) > len(lineage)
