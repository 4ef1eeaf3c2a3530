"""Helpers for the end-to-end tests: synthetic jobs in a file:// bucket and their results."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import redis
import tifffile
from scipy.optimize import linear_sum_assignment

import kiosk_protocol as protocol
from kiosk_model_server.synthetic import make_cells


def submit_cells(client: redis.Redis, bucket: Path, count: int, queue: str = "segmentation",
                 shape: tuple[int, int] = (128, 128), n_cells: int = 8) -> dict[str, np.ndarray]:
    """``count`` synthetic cell images saved as TIFF, submitted as Kiosk jobs; job key -> true labels."""
    truths: dict[str, np.ndarray] = {}
    for seed in range(count):
        image, labels = make_cells(shape, n_cells, seed=seed)
        name = f"cells-{seed}.tif"
        tifffile.imwrite(bucket / name, image)
        key = protocol.submit_job(client, queue, name, "segmentation", "1")
        truths[key] = labels
    return truths


def statuses(client: redis.Redis, keys: list[str]) -> dict[str, int]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, "status")
    out: dict[str, int] = {}
    for status in pipe.execute():
        out[status] = out.get(status, 0) + 1
    return out


def result_labels(job: dict[str, str]) -> np.ndarray:
    """The single label TIFF inside a finished job's result zip (file:// output_url is a path)."""
    with zipfile.ZipFile(job["output_url"]) as zf:
        (member,) = zf.namelist()
        with zf.open(member) as fh:
            return tifffile.imread(fh)


def mean_matched_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over true cells of the IoU with their optimally matched predicted cell (0 if unmatched)."""
    true_ids = [int(v) for v in np.unique(truth) if v]
    pred_ids = [int(v) for v in np.unique(pred) if v]
    if not true_ids:
        return 1.0 if not pred_ids else 0.0
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for i, t in enumerate(true_ids):
        tm = truth == t
        for j, p in enumerate(pred_ids):
            pm = pred == p
            inter = np.logical_and(tm, pm).sum()
            if inter:
                iou[i, j] = inter / np.logical_or(tm, pm).sum()
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].sum() / len(true_ids))
