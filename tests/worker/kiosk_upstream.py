"""The Kiosk's own rules, restated for tests (imported as ``kiosk_upstream``).

Written from kiosk-redis-consumer at a183af9c66b2f3b278d600619ab28b24aa84bac6
(redis_consumer/consumers/segmentation_consumer.py: ``image_dimensions_to_bxyc`` and the
per-channel loop of ``_consume``; redis_consumer/settings.py: MODEL_CHOICES) and
kiosk-frontend at cd5c8c39c1bb2d7530c2eb79fe138697322f67d2, so tests compare the worker
with what the Kiosk would do rather than with the worker's own code.
"""

from __future__ import annotations

import numpy as np

#: The orders the frontend offers (src/Predict/JobForm/DimensionOrderDropdown.js).
FRONTEND_ORDERS = ("XY", "BXY", "CXY", "XYB", "XYC", "BXYC", "CXYB")
#: MODEL_CHOICES with their defaults (NUCLEAR_MODEL, CYTOPLASM_MODEL, PHASE_MODEL), by position.
DEFAULT_CHOICES = (("NuclearSegmentation", 6), ("CytoplasmSegmentation", 5), ("PhaseCytoSegmentation", 0))


def upstream_bxyc(image: np.ndarray, dim_order: str) -> np.ndarray:
    """What image_dimensions_to_bxyc makes of an image: the rank must match the order; XYB
    moves the last axis to the front, CXY the first to the back, CXYB swaps first and last;
    every other order is taken as it is; then a batch axis is put first if there is no B and
    a channel axis last if there is no C."""
    if image.ndim != len(dim_order):
        raise ValueError(f"{dim_order} does not fit shape {image.shape}")
    move = {"XYB": (-1, 0), "CXY": (0, -1)}.get(dim_order)
    if move:
        image = np.moveaxis(image, *move)
    elif dim_order == "CXYB":
        image = np.swapaxes(image, 0, -1)
    if "B" not in dim_order:
        image = image[np.newaxis]
    if "C" not in dim_order:
        image = image[..., np.newaxis]
    return image


def upstream_steps(channels: str) -> list[tuple[int, int]]:
    """(position, image channel) of every filled entry of ``channels``; position i runs
    MODEL_CHOICES[i] on that channel and the label images are stacked in this order."""
    return [(pos, int(entry)) for pos, entry in enumerate(channels.split(",")) if entry]
