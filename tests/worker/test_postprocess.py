"""Deep-watershed post-processing: deepcell-toolbox's algorithm and defaults, parameter by parameter.

Upstream: deepcell-toolbox deepcell_toolbox/deep_watershed.py ``deep_watershed`` at commit
e8c1277ee4243bc6a34916d554d0c2eab0cf7505; its outputs come from DeepCell models trained on
deepcell-tf's transforms (deepcell/utils/transform_utils.py: ``inner_distance_transform_2d``,
``pixelwise_transform``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from skimage.measure import regionprops
from skimage.segmentation import find_boundaries
from workerkit import mean_matched_iou

from kiosk_model_server.synthetic import make_cells
from kiosk_protocol.settings import load_settings
from kiosk_worker.errors import JobError, ModelMismatch
from kiosk_worker.postprocess import (
    WatershedParams,
    check_postprocess_function,
    deep_watershed,
    label_batch,
    label_outputs,
    params_for,
    select_outputs,
)

# deep_watershed's signature at e8c1277 (pixel_expansion=None means none: 0 here), plus the
# ``kwargs.get('exclude_border', False)`` it hands to peak_local_max.
UPSTREAM_DEFAULTS = {
    "radius": 10, "maxima_threshold": 0.1, "interior_threshold": 0.01, "maxima_smooth": 0,
    "interior_smooth": 1, "maxima_index": 0, "interior_index": -1, "label_erosion": 0,
    "small_objects_threshold": 0, "fill_holes_threshold": 0, "pixel_expansion": 0,
    "maxima_algorithm": "h_maxima", "exclude_border": False,
}

YY, XX = np.mgrid[:64, :64]


def cone(cy: float, cx: float, r: float, height: float = 1.0) -> np.ndarray:
    return (np.clip(1 - np.hypot(YY - cy, XX - cx) / r, 0, None) * height).astype(np.float32)


def disk(cy: float, cx: float, r: float) -> np.ndarray:
    return (np.hypot(YY - cy, XX - cx) <= r).astype(np.float32)


def bump(cy: float, cx: float, sigma: float, height: float = 1.0) -> np.ndarray:
    return (height * np.exp(-((YY - cy) ** 2 + (XX - cx) ** 2) / (2 * sigma**2))).astype(np.float32)


def count(labels: np.ndarray) -> int:
    return len(np.unique(labels[labels > 0]))


def area(labels: np.ndarray) -> int:
    return int((labels > 0).sum())


def deepcell_outputs(truth: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """What a DeepCell model is trained to output for these labels (restated from deepcell-tf):
    inner distance 1 / (1 + alpha * squared distance to the cell's centre) with alpha 0.1, and the
    interior class of the pixelwise transform (the cell minus its inner boundary) as a probability."""
    inner = np.zeros(truth.shape, np.float32)
    for prop in regionprops(truth):
        d2 = ((prop.coords - prop.centroid) ** 2).sum(axis=1)
        inner[tuple(prop.coords.T)] = 1 / (1 + 0.1 * d2)
    inner += np.random.default_rng(seed).normal(0, 0.05, truth.shape).astype(np.float32)
    interior = (truth > 0) & ~find_boundaries(truth, mode="inner")
    return inner, np.where(interior, 0.98, 0.002).astype(np.float32)


# ---- defaults and accuracy ------------------------------------------------------------------


def test_defaults_are_deepcell_toolbox_defaults() -> None:
    assert dataclasses.asdict(WatershedParams()) == UPSTREAM_DEFAULTS
    # The worker's settings (POSTPROCESS_*) default to the same values.
    assert WatershedParams.from_settings(load_settings({})) == WatershedParams()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_cells_with_the_default_parameters(seed: int) -> None:
    _, truth = make_cells(seed=seed)
    inner, interior = deepcell_outputs(truth, seed)
    labels = deep_watershed(inner, interior)
    assert labels.dtype == np.int32 and labels.shape == truth.shape
    assert count(labels) == count(truth)
    assert mean_matched_iou(labels, truth) >= 0.8


def test_empty_outputs_give_no_cells() -> None:
    zeros = np.zeros((32, 32), np.float32)
    assert not deep_watershed(zeros, zeros).any()
    assert label_batch(zeros[None, ..., None], zeros[None, ..., None]).shape == (1, 32, 32)


# ---- one test per parameter: the default and a changed value give the expected difference ----


def test_radius() -> None:
    # Two seeds 8 px apart: a 10 px footprint reaches from the higher one over the lower one.
    maxima = np.maximum(cone(32, 28, 5), cone(32, 36, 5, 0.8))
    interior = np.maximum(disk(32, 28, 6), disk(32, 36, 6))
    assert count(deep_watershed(maxima, interior)) == 1
    assert count(deep_watershed(maxima, interior, WatershedParams(radius=3))) == 2


def test_maxima_threshold() -> None:
    maxima = np.maximum(cone(32, 20, 8), cone(32, 44, 8, 0.05))  # the second peak rises 0.05
    interior = np.maximum(disk(32, 20, 9), disk(32, 44, 9))
    assert count(deep_watershed(maxima, interior)) == 1
    assert count(deep_watershed(maxima, interior, WatershedParams(maxima_threshold=0.01))) == 2


def test_interior_threshold() -> None:
    maxima = cone(32, 32, 8)
    interior = np.where(disk(32, 32, 8) > 0, 1.0, np.where(disk(32, 32, 14) > 0, 0.05, 0.0)).astype(np.float32)
    wide = deep_watershed(maxima, interior)
    narrow = deep_watershed(maxima, interior, WatershedParams(interior_threshold=0.1))
    assert area(wide) > disk(32, 32, 14).sum() > disk(32, 32, 8).sum() < area(narrow) < disk(32, 32, 11).sum()


def test_interior_smooth() -> None:
    maxima, interior = cone(32, 32, 8), disk(32, 32, 8)
    assert area(deep_watershed(maxima, interior, WatershedParams(interior_smooth=0))) == interior.sum()
    # A blur of sigma 1 thresholded at 0.01 reaches about 2.3 px past the interior's edge.
    assert area(deep_watershed(maxima, interior)) > disk(32, 32, 10).sum()


def test_maxima_smooth() -> None:
    maxima = np.maximum(bump(32, 29, 1.5), bump(32, 35, 1.5))  # two close peaks
    interior = disk(32, 32, 10)
    assert count(deep_watershed(maxima, interior, WatershedParams(radius=2))) == 2
    assert count(deep_watershed(maxima, interior, WatershedParams(radius=2, maxima_smooth=3))) == 1


def test_maxima_algorithm() -> None:
    # Two bumps of 0.05 and 0.03 on one plateau: h_maxima keeps only the one that rises h=0.1
    # above the reconstruction; peak_local_max keeps both local maxima above 0.1 (12 px apart).
    maxima = np.minimum(bump(32, 32, 6), 0.5) + cone(32, 26, 3, 0.05) + cone(32, 38, 3, 0.03)
    interior = disk(32, 32, 14)
    assert count(deep_watershed(maxima, interior)) == 1
    assert count(deep_watershed(maxima, interior, WatershedParams(maxima_algorithm="peak_local_max"))) == 2


def test_exclude_border() -> None:
    maxima, interior = cone(3, 32, 6), disk(3, 32, 7)  # a cell whose centre is 3 px from the edge
    plm = WatershedParams(maxima_algorithm="peak_local_max")
    assert count(deep_watershed(maxima, interior, plm)) == 1
    assert count(deep_watershed(maxima, interior, dataclasses.replace(plm, exclude_border=True))) == 0
    # Upstream hands it to peak_local_max only.
    assert count(deep_watershed(maxima, interior, WatershedParams(exclude_border=True))) == 1


def test_label_erosion() -> None:
    maxima, interior = cone(32, 32, 8), disk(32, 32, 8)
    full = deep_watershed(maxima, interior, WatershedParams(interior_smooth=0))
    eroded = deep_watershed(maxima, interior, WatershedParams(interior_smooth=0, label_erosion=2))
    assert area(full) == interior.sum()
    assert area(eroded) == disk(32, 32, 6).sum()  # two rings of edge pixels gone


def test_small_objects_threshold() -> None:
    maxima = np.maximum(cone(20, 20, 10), cone(44, 44, 3))
    interior = np.maximum(disk(20, 20, 10), disk(44, 44, 3))  # 317 and 29 pixels
    params = WatershedParams(interior_smooth=0)
    assert sorted(np.bincount(deep_watershed(maxima, interior, params).ravel())[1:]) == [29, 317]
    kept = deep_watershed(maxima, interior, dataclasses.replace(params, small_objects_threshold=100))
    assert count(kept) == 1 and area(kept) == 317


def test_fill_holes_threshold() -> None:
    ring = ((disk(32, 32, 12) > 0) & ~(disk(32, 32, 3) > 0)).astype(np.float32)  # a 29 px hole
    maxima = cone(32, 23, 4) * ring
    params = WatershedParams(interior_smooth=0)
    holed = deep_watershed(maxima, ring, params)
    filled = deep_watershed(maxima, ring, dataclasses.replace(params, fill_holes_threshold=50))
    assert holed[32, 32] == 0 and area(holed) == ring.sum()
    # Only the hole: upstream also filled the corners of the 25x25 bounding box outside the
    # ring (46 px each, under the threshold), a deliberate difference (see postprocess.py).
    assert filled[32, 32] == 1 and area(filled) == disk(32, 32, 12).sum()
    # Holes of the threshold's size or more stay (upstream fills those smaller than it).
    assert deep_watershed(maxima, ring, dataclasses.replace(params, fill_holes_threshold=29))[32, 32] == 0


def test_pixel_expansion() -> None:
    maxima, interior = cone(32, 32, 8), disk(32, 32, 8)
    params = WatershedParams(interior_smooth=0)
    assert area(deep_watershed(maxima, interior, params)) == interior.sum()
    grown = deep_watershed(maxima, interior, dataclasses.replace(params, pixel_expansion=2))
    # A 5x5 square dilation of the disk: its bounding box grows by 2 px on each side.
    ys, xs = np.nonzero(grown)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (22, 42, 22, 42)


def _semantic_outputs() -> dict[str, np.ndarray]:
    """A model with DeepCell's own output names (semantic heads), batch of one, channels last."""
    maxima = np.maximum(cone(20, 20, 8), cone(44, 44, 8))
    interior = np.maximum(disk(20, 20, 9), disk(44, 44, 9))
    one = disk(44, 44, 9)  # an interior with only the second cell
    return {"semantic_0": maxima[None, ..., None], "semantic_1": one[None, ..., None],
            "semantic_2": interior[None, ..., None]}


def test_maxima_index_and_interior_index() -> None:
    outputs = _semantic_outputs()
    assert count(label_outputs(outputs)) == 2  # semantic_0 seeds, semantic_2 (the last) masks
    assert count(label_outputs(outputs, WatershedParams(interior_index=1))) == 1
    # Seeds from the second cell's interior map: only its one seed grows.
    assert count(label_outputs(outputs, WatershedParams(maxima_index=1))) == 1
    with pytest.raises(ModelMismatch, match="maxima_index 5"):
        label_outputs(outputs, WatershedParams(maxima_index=5))


def test_outputs_named_ours_are_used_by_name() -> None:
    semantic = _semantic_outputs()
    ours = {"foreground": semantic["semantic_2"], "inner_distance": semantic["semantic_0"],
            "zzz_extra": semantic["semantic_1"]}
    maxima, interior = select_outputs(ours, WatershedParams(maxima_index=1, interior_index=1))
    assert maxima is ours["inner_distance"] and interior is ours["foreground"]


def test_interior_channel_of_multi_class_outputs() -> None:
    """A 3-class pixelwise head [edge, interior, background]: channel 1 is the interior."""
    maxima = cone(32, 32, 8)[None, ..., None]
    interior = disk(32, 32, 8)
    pixelwise = np.stack([np.zeros_like(interior), interior, 1 - interior], axis=-1)[None]
    labels = label_batch(maxima, pixelwise, WatershedParams(interior_smooth=0))
    assert area(labels) == interior.sum()


# ---- settings and the job's postprocess_function --------------------------------------------


def test_settings_reach_the_parameters() -> None:
    env = {"POSTPROCESS_RADIUS": "3", "POSTPROCESS_MAXIMA_THRESHOLD": "0.2", "POSTPROCESS_INTERIOR_THRESHOLD": "0.3",
           "POSTPROCESS_MAXIMA_SMOOTH": "1.5", "POSTPROCESS_INTERIOR_SMOOTH": "0", "POSTPROCESS_MAXIMA_INDEX": "1",
           "POSTPROCESS_INTERIOR_INDEX": "-2", "POSTPROCESS_LABEL_EROSION": "1",
           "POSTPROCESS_SMALL_OBJECTS_THRESHOLD": "15", "POSTPROCESS_FILL_HOLES_THRESHOLD": "15",
           "POSTPROCESS_PIXEL_EXPANSION": "2", "POSTPROCESS_MAXIMA_ALGORITHM": "peak_local_max",
           "POSTPROCESS_EXCLUDE_BORDER": "true"}
    params = params_for(load_settings(env), {"postprocess_function": ""})
    assert dataclasses.asdict(params) == {
        "radius": 3, "maxima_threshold": 0.2, "interior_threshold": 0.3, "maxima_smooth": 1.5,
        "interior_smooth": 0.0, "maxima_index": 1, "interior_index": -2, "label_erosion": 1,
        "small_objects_threshold": 15, "fill_holes_threshold": 15, "pixel_expansion": 2,
        "maxima_algorithm": "peak_local_max", "exclude_border": True,
    }


@pytest.mark.parametrize("value", ["", None, "deep_watershed", " Deep_Watershed ", "deep_watershed,"])
def test_postprocess_function_accepted(value: str | None) -> None:
    check_postprocess_function(value)


@pytest.mark.parametrize("value", ["retinanet", "watershed", "pixelwise", "none", "deep_watershed,pixelwise",
                                   "deep_watershed,deep_watershed"])
def test_postprocess_function_refused_in_one_line(value: str) -> None:
    with pytest.raises(JobError) as info:
        params_for(load_settings({}), {"postprocess_function": value})
    message = str(info.value)
    assert message.startswith(f"postprocess_function {value!r} is not supported") and "\n" not in message
    assert "deep_watershed" in message


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="maxima_algorithm"):
        WatershedParams(maxima_algorithm="watershed")
    with pytest.raises(ValueError, match="radius"):
        WatershedParams(radius=0)
    with pytest.raises(ValueError, match="pixel_expansion"):
        WatershedParams(pixel_expansion=-1)
