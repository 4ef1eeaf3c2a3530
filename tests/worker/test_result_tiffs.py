"""Result TIFFs: written by libtiff (2D) or tifffile (stacks), read back exactly by tifffile; named as
the Kiosk named them."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from kiosk_worker import results
from kiosk_worker.results import label_members, result_stem, save_labels, tiff_bytes, zip_arrays_bytes


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


# ---- result names: the Kiosk's rule ------------------------------------------------------------


def kiosk_member_names(save_name: str, results_bxyc_shape: tuple[int, int, int, int]) -> list[str]:
    """The zip members the Kiosk's segmentation consumer writes, restated from kiosk-redis-consumer
    at a183af9c66b2f3b278d600619ab28b24aa84bac6: consumers/segmentation_consumer.py ``save_output``
    names batch item i ``{name}_batch_{i}`` (name = the base name of original_name, or of
    input_file_name, without extension) and utils.py ``save_numpy_array`` writes one
    ``{name}_feature_{c}.tif`` per channel c of the (batch, x, y, c) results."""
    name = os.path.splitext(os.path.basename(save_name))[0]
    batches, _, _, channels = results_bxyc_shape
    return [f"{name}_batch_{i}_feature_{c}.tif" for i in range(batches) for c in range(channels)]


@pytest.mark.parametrize(("labels_shape", "bxyc"), [
    ((16, 20), (1, 16, 20, 1)),          # one 2D image
    ((3, 16, 20), (3, 16, 20, 1)),       # a stack: one label image per frame
    ((2, 16, 20, 2), (2, 16, 20, 2)),    # two frames, two models (e.g. nuclear + cytoplasm)
])
def test_member_names_follow_the_kiosk(labels_shape: tuple[int, ...], bxyc: tuple[int, int, int, int]) -> None:
    labels = np.arange(np.prod(labels_shape), dtype=np.int64).reshape(labels_shape) % 7
    original_name = "plate 1/cells_A1.tif"
    members = label_members(labels, result_stem(original_name))
    assert sorted(members) == sorted(kiosk_member_names(original_name, bxyc))
    stack = labels.reshape(bxyc)
    for i in range(bxyc[0]):
        for c in range(bxyc[3]):
            frame = members[f"cells_A1_batch_{i}_feature_{c}.tif"]
            assert frame.dtype == np.int32
            np.testing.assert_array_equal(frame, stack[i, ..., c])


def test_zip_of_members_round_trips() -> None:
    labels = (np.arange(2 * 8 * 9).reshape(2, 8, 9) % 5).astype(np.int32)
    data = zip_arrays_bytes(label_members(labels, "img"))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["img_batch_0_feature_0.tif", "img_batch_1_feature_0.tif"]
        np.testing.assert_array_equal(tifffile.imread(io.BytesIO(zf.read("img_batch_1_feature_0.tif"))), labels[1])


def test_saved_files_have_the_member_names(tmp_path: Path) -> None:
    labels = np.ones((2, 4, 4), np.int32)
    paths = save_labels(labels, str(tmp_path), "img")
    assert [os.path.basename(p) for p in paths] == ["img_batch_0_feature_0.tif", "img_batch_1_feature_0.tif"]
    np.testing.assert_array_equal(tifffile.imread(paths[1]), labels[1])


def test_zip_files_flat_or_below_a_root_as_the_kiosk(tmp_path: Path) -> None:
    """The Kiosk's utils.zip_files names members by their path below the temp dir (a183af9)."""
    (tmp_path / "sub").mkdir()
    paths = [tmp_path / "a.tif", tmp_path / "sub" / "b.tif"]
    for p in paths:
        p.write_bytes(b"x")
    flat = results.zip_files([str(p) for p in paths], str(tmp_path / "flat.zip"))
    rooted = results.zip_files([str(p) for p in paths], str(tmp_path / "rooted.zip"), root=str(tmp_path))
    with zipfile.ZipFile(flat) as zf:
        assert zf.namelist() == ["a.tif", "b.tif"]
    with zipfile.ZipFile(rooted) as zf:
        assert zf.namelist() == ["a.tif", "sub/b.tif"]
    with pytest.raises(ValueError, match="not below"):
        results.zip_files([str(paths[0])], str(tmp_path / "x.zip"), root=str(tmp_path / "sub"))
