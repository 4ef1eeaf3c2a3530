"""Hostile jobs, one guard at a time: decoded-size cap, channel list cap, TIFF compressions,
tracking caps and sparse overlaps, the attempt count of the START script (real redis-server)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

import kiosk_protocol as protocol
from kiosk_protocol.jobs import JobStore
from kiosk_protocol.settings import load_settings
from kiosk_worker import imaging, tracking
from kiosk_worker.errors import BadImage, ImageTooLarge, ModelMismatch, UnsupportedFormat
from kiosk_worker.jobwrites import JobWriter
from kiosk_worker.work import WorkItem

# --- MAX_DECODED_BYTES ---------------------------------------------------------------------------


def test_the_issue_poison_tiff_is_refused_from_its_header(tmp_path: Path) -> None:
    """128 x 4096 x 4096 uint16 (4 GiB decoded) passes the height/width check when those limits
    allow 4096; the decoded-size cap refuses it before one pixel is decoded."""
    path = tmp_path / "poison.tif"
    zeros = np.zeros((4096, 4096), np.uint16)
    tifffile.imwrite(path, (zeros for _ in range(128)), shape=(128, 4096, 4096), dtype=np.uint16,
                     compression="zlib")
    assert path.stat().st_size < 20 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge, match=r"128x4096x4096 uint16 decodes to 4294967296 bytes, "
                                                r"over the limit of 1073741824 \(MAX_DECODED_BYTES\)"):
            imaging.load_image(str(path), 8192, 8192)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # nothing near the decoded size was allocated


@pytest.mark.parametrize("fmt", ["tiff", "npy", "png"])
def test_decoded_size_counts_frames_channels_and_sample_size(tmp_path: Path, fmt: str) -> None:
    image = np.zeros((4, 32, 32, 2), np.uint16) if fmt != "png" else np.zeros((32, 32), np.uint16)
    path = tmp_path / f"x.{'tif' if fmt == 'tiff' else fmt}"
    if fmt == "tiff":
        tifffile.imwrite(path, image)
    elif fmt == "npy":
        np.save(path, image)
    else:
        from PIL import Image

        Image.fromarray(image).save(path)  # 16-bit grayscale PNG
    size = image.size * 2
    assert imaging.read_header(str(path)).decoded_bytes == size
    assert imaging.load_image(str(path), max_decoded_bytes=size).shape == image.shape
    with pytest.raises(ImageTooLarge, match="MAX_DECODED_BYTES"):
        imaging.load_image(str(path), max_decoded_bytes=size - 1)


def test_max_decoded_bytes_default_is_the_settings_default(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
    assert imaging.load_image(str(path)).shape == (64, 64)
    with pytest.raises(ImageTooLarge, match="over the limit of 4095"):
        imaging.load_image(str(path), max_decoded_bytes=4095)
    assert load_settings({}).max_decoded_bytes == 1 << 30


# --- channels ------------------------------------------------------------------------------------


def test_a_long_channel_list_fails_before_any_copy() -> None:
    image = np.zeros((1, 512, 512, 1), np.float32)  # 1 MiB
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match=r"channels lists 1501 entries, more than MAX_CHANNEL_ENTRIES \(64\)"):
            imaging.fit_channels(image, "0," * 1500, None)
        with pytest.raises(ModelMismatch, match="image has 60 channel"):  # under the cap, wrong count
            imaging.fit_channels(image, ",".join(["0"] * 60), 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # not one stacked copy (60 of them would be 60 MiB)
    assert imaging.fit_channels(image, ",".join(["0"] * 64), 64).shape == (1, 512, 512, 64)


# --- TIFF compressions ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "adobe_deflate", "zstd", "packbits", "jpeg",
                                         "lzma"])
def test_common_tiff_compressions_decode(tmp_path: Path, compression: str | None) -> None:
    image = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    tifffile.imwrite(tmp_path / "x.tif", image, compression=compression)
    assert imaging.load_image(str(tmp_path / "x.tif")).shape == (64, 64)


@pytest.mark.parametrize("compression,name", [("jpeg2000", "JPEG2000"), ("jpegxl", "JPEGXL"),
                                              ("lerc", "LERC")])
def test_other_tiff_compressions_fail_naming_it(tmp_path: Path, compression: str, name: str) -> None:
    image = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    tifffile.imwrite(tmp_path / "x.tif", image, compression=compression)
    with pytest.raises(UnsupportedFormat, match=f"uses compression {name}, which is not accepted") as info:
        imaging.load_image(str(tmp_path / "x.tif"))
    assert "\n" not in str(info.value)


# --- tracking ------------------------------------------------------------------------------------


def _grid(cells_per_side: int, size: int = 512, shift: int = 0) -> np.ndarray:
    """Square cells tiling a size x size frame, labels 1..cells_per_side**2."""
    step = size // cells_per_side
    idx = np.minimum((np.arange(size) + shift) // step, cells_per_side - 1)
    return (idx[:, None] * cells_per_side + idx[None, :] + 1).astype(np.int32)


def test_frame_overlap_from_sparse_pair_counts_matches_a_dense_count() -> None:
    """Only the label pairs that occur are counted (at most one per pixel), no P x N counters;
    the result must equal a dense count, background and label gaps included."""
    prev, nxt = _grid(16, 128), _grid(16, 128, shift=5)
    prev[prev % 7 == 0] = 0  # background and missing labels
    nxt[:, :9] = 0
    nxt[nxt == 40] = 900  # a label value far above the others
    ov = tracking.frame_overlap(prev, nxt)
    dense = np.zeros((prev.max() + 1, nxt.max() + 1), np.int64)
    np.add.at(dense, (prev.ravel(), nxt.ravel()), 1)
    rows, cols = np.unique(prev)[1:], np.unique(nxt)[1:]
    assert (ov.prev_ids == rows).all() and (ov.next_ids == cols).all()
    assert (ov.inter.toarray() == dense[np.ix_(rows, cols)]).all()
    assert (ov.prev_area == dense.sum(axis=1)[rows]).all() and (ov.next_area == dense.sum(axis=0)[cols]).all()


def test_tracking_caps_frames_and_cells_before_any_overlap() -> None:
    stack = np.stack([_grid(128)] * 2)  # 16,384 cells per frame
    with pytest.raises(tracking.TrackingTooLarge, match=r"frame 0 has 16384 cells, more than "
                                                       r"MAX_CELLS_PER_FRAME \(2048\)"):
        tracking.track(stack, tracking.TrackingParams())
    with pytest.raises(tracking.TrackingTooLarge, match=r"movie has 61 frames, more than MAX_IMAGE_FRAMES \(60\)"):
        tracking.track(np.zeros((61, 8, 8), np.int32), tracking.TrackingParams())
    small = np.stack([_grid(4, 64), _grid(4, 64, shift=1)])
    assert len(tracking.track(small, tracking.TrackingParams(max_cells=16)).lineage) == 16


def test_tracking_consumer_takes_its_caps_from_settings() -> None:
    from kiosk_worker.consumers.tracking import TrackingConsumer

    settings = load_settings({"MAX_CELLS_PER_FRAME": "3", "MAX_IMAGE_FRAMES": "2"})
    consumer = TrackingConsumer.__new__(TrackingConsumer)  # only its settings matter here
    consumer.settings = settings
    caps = consumer.params
    assert (caps.max_cells, caps.max_frames) == (3, 2)
    from kiosk_worker import tracking_caliban

    with pytest.raises(tracking.TrackingTooLarge, match=r"MAX_CELLS_PER_FRAME \(3\)"):
        tracking_caliban.check_caps(np.stack([_grid(2, 16)]), caps.max_frames, caps.max_cells)


# --- attempts (START script, real redis-server) ------------------------------------------------


def test_start_counts_takes_and_refuses_after_max_attempts(redis_client) -> None:
    key = protocol.submit_job(redis_client, "q", "x.tif", "m", "1")
    store = JobStore(redis_client, "w1", max_attempts=2)
    for take in (1, 2):
        assert redis_client.rpoplpush("q", protocol.processing_key("q", "w1")) == key
        fields, _ = store.start(key)
        assert fields is not None and fields["attempts"] == str(take)
        redis_client.hset(key, "status", "new")  # the worker died; its item came back
        redis_client.lrem(protocol.processing_key("q", "w1"), 1, key)
        redis_client.rpush("q", key)
    writer = JobWriter(store, redis_client)
    from kiosk_worker.errors import JobError

    with pytest.raises(JobError, match="^worker died 2 times on this job$"):
        writer.start(key, announce=True)
    assert redis_client.hget(key, "attempts") == "2"  # the refused take wrote nothing
    assert redis_client.hget(key, "status") == "new"


def test_graceful_give_back_and_put_back_do_not_count(redis_client) -> None:
    key = protocol.submit_job(redis_client, "q", "x.tif", "m", "1")
    store = JobStore(redis_client, "w1", max_attempts=1)
    writer = JobWriter(store, redis_client)
    item = WorkItem(key=key, queue="q")
    for _ in range(3):
        assert redis_client.rpoplpush("q", protocol.processing_key("q", "w1")) == key
        writer.begin()
        fields, _ = writer.start(key, announce=True)
        assert fields is not None and fields["attempts"] == "1"
        assert writer.give_back(item, reset=True)  # SIGTERM drain: not a death
        assert redis_client.hget(key, "attempts") == "0"
    assert redis_client.rpoplpush("q", protocol.processing_key("q", "w1")) == key
    writer.begin()
    writer.start(key, announce=True)
    writer.put_back(item, "waiting")
    assert redis_client.hget(key, "attempts") == "0"
    # a take that is not announced (a zip parent polling its children) is not counted at all
    assert redis_client.rpoplpush("q", protocol.processing_key("q", "w1")) == key
    writer.begin()
    fields, _ = writer.start(key, announce=False)
    assert fields is not None and redis_client.hget(key, "attempts") == "0"


def test_a_job_reclaimed_from_dead_workers_fails_at_the_next_take(redis_client) -> None:
    """Reclaim (the operator's path for a worker whose pod is gone) requeues the item as
    before; the count kept in the hash makes the next take fail it instead of killing again."""
    from kiosk_protocol import registry

    key = protocol.submit_job(redis_client, "q", "x.tif", "m", "1")
    for dead in ("pod-1", "pod-2", "pod-3"):
        held = protocol.processing_key("q", dead)
        assert redis_client.rpoplpush("q", held) == key
        fields, _ = JobStore(redis_client, dead, max_attempts=3).start(key)
        assert fields is not None
        # the pod is OOM-killed; the operator's reclaim pass returns its item
        assert registry.reclaim_list(redis_client, held, "q")["requeued"] == 1
    assert redis_client.hget(key, "attempts") == "3"
    live = JobStore(redis_client, "pod-4", max_attempts=3)
    assert redis_client.rpoplpush("q", protocol.processing_key("q", "pod-4")) == key
    from kiosk_worker.errors import JobError

    with pytest.raises(JobError, match="^worker died 3 times on this job$"):
        JobWriter(live, redis_client).start(key, announce=True)
