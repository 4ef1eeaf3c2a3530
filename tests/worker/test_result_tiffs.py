"""Result TIFFs: written by libtiff (2D) or tifffile (stacks), read back exactly by tifffile."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

from kiosk_worker.results import tiff_bytes


@pytest.mark.parametrize("shape", [(32, 32), (7, 5), (1, 1), (123, 457), (500, 1)])
@pytest.mark.parametrize("dtype", ["int32", "uint16", "float32"])
def test_2d_results_round_trip(shape: tuple[int, int], dtype: str) -> None:
    arr = (np.arange(np.prod(shape)).reshape(shape) % 97).astype(dtype)
    data = tiff_bytes(arr)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.pages[0].compression == 1  # uncompressed, as upstream
        np.testing.assert_array_equal(tif.asarray(), arr)


def test_stacks_round_trip_through_tifffile() -> None:
    stack = np.arange(3 * 8 * 9, dtype=np.int32).reshape(3, 8, 9)
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(tiff_bytes(stack))), stack)


def test_non_contiguous_input_is_written_correctly() -> None:
    arr = np.arange(64, dtype=np.int32).reshape(8, 8)[:, ::2]
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(tiff_bytes(arr))), arr)
