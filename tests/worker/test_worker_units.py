"""Pure parts of the worker: tiling, layouts, channels, header checks, post-processing, reasons."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from harness.redis_server import RedisServer
from kiosk_protocol.redis_config import connect, parse_sentinel_hosts
from kiosk_protocol.settings import SettingsError, load_settings
from kiosk_worker import errors, imaging, results, tiling
from kiosk_worker.postprocess import deep_watershed, label_batch


@pytest.mark.parametrize("length, tile, overlap", [(10, 64, 16), (64, 64, 16), (65, 64, 16),
                                                   (200, 64, 16), (1000, 96, 0), (130, 64, 63)])
def test_tile_spans_cover_every_pixel_exactly_once(length, tile, overlap):
    spans = tiling.plan_axis(length, tile, overlap)
    owned = np.zeros(length, dtype=int)
    for span in spans:
        assert span.origin <= span.start < span.stop <= span.origin + tile
        assert span.origin + tile <= max(length, tile)
        owned[span.start:span.stop] += 1
    assert (owned == 1).all()


@pytest.mark.parametrize("shape, tile", [((2, 200, 150, 3), (64, 64)), ((1, 40, 30, 1), (64, 64)),
                                         ((1, 64, 64, 1), (64, 64)), ((1, 129, 300, 2), (64, 96))])
def test_tile_then_stitch_is_the_identity(shape, tile):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    tiles, plan = tiling.tile_image(image, *tile)
    assert tiles.shape[1:3] == tile and tiles.shape[0] == plan.count
    assert np.array_equal(tiling.stitch(tiles, plan), image)


def test_stitch_takes_each_pixel_from_the_tile_where_it_is_most_central():
    tiles, plan = tiling.tile_image(np.zeros((1, 100, 64, 1), np.float32), 64, 64, overlap=28)
    ids = np.arange(plan.count, dtype=np.float32)[:, None, None, None] * np.ones_like(tiles)
    out = tiling.stitch(ids, plan)[0, :, 0, 0]
    # Tiles at rows 0 and 36 overlap on [36, 64): the boundary is in the middle, at 50.
    assert (out[:50] == 0).all() and (out[50:] == 1).all()


def test_needs_tiling():
    assert not tiling.needs_tiling(100, 100, None, None)
    assert not tiling.needs_tiling(64, 64, 64, 64)
    assert tiling.needs_tiling(32, 64, 64, 64)


@pytest.mark.parametrize("shape, order, expected", [
    ((30, 40), "", (1, 30, 40, 1)),
    ((30, 40, 3), "", (1, 30, 40, 3)),
    ((2, 30, 40), "", (1, 30, 40, 2)),
    ((5, 30, 40), "", (5, 30, 40, 1)),
    ((5, 30, 40), "ZYX", (5, 30, 40, 1)),
    ((3, 30, 40), "CYX", (1, 30, 40, 3)),
    ((4, 2, 30, 40), "TCYX", (4, 30, 40, 2)),
    ((30, 40, 5), "YXC", (1, 30, 40, 5)),
    ((40, 30), "XY", (1, 40, 30, 1)),  # the Kiosk's XY: first axis X, nothing transposed
])
def test_layouts_become_nhwc(shape, order, expected):
    array = np.arange(np.prod(shape)).reshape(shape)
    assert imaging.to_nhwc(array, order).shape == expected


def test_xy_orders_keep_the_file_orientation():
    array = np.arange(12).reshape(3, 4)  # the Kiosk calls the first axis X
    assert np.array_equal(imaging.to_nhwc(array, "XY")[0, ..., 0], array)
    assert np.array_equal(imaging.to_nhwc(array, "YX")[0, ..., 0], array)


@pytest.mark.parametrize("order", ["YXQ", "YY", "YXC", "CZYXT"])
def test_bad_dimension_orders_are_rejected(order):
    with pytest.raises(errors.BadImage, match="dimension_order"):
        imaging.to_nhwc(np.zeros((2, 3)), order)


def test_fit_channels_selects_blanks_and_checks_the_model():
    image = np.stack([np.full((4, 4), v) for v in (1, 2, 3)], axis=-1)[np.newaxis]
    assert imaging.fit_channels(image, "2,,0", 3)[0, 0, 0].tolist() == [3, 0, 1]  # blank = zeros
    assert imaging.fit_channels(image, "2,,0", None)[0, 0, 0].tolist() == [3, 1]  # blank = none
    assert imaging.fit_channels(image, "0,", 1)[0, 0, 0].tolist() == [1]  # the frontend's "0,"
    assert imaging.fit_channels(image, "1", 1)[0, 0, 0].tolist() == [2]
    with pytest.raises(errors.ModelMismatch, match="3 channel"):
        imaging.fit_channels(image, "", 1)
    with pytest.raises(errors.ModelMismatch, match="channel 7"):
        imaging.fit_channels(image, "7", None)
    with pytest.raises(errors.BadImage, match="channel numbers"):
        imaging.fit_channels(image, "red", None)


def test_header_size_check_uses_the_dimension_order():
    info = imaging.ImageInfo("tiff", (3, 100, 5000))
    imaging.check_size(info, 200, 6000, "CYX")
    with pytest.raises(errors.ImageTooLarge, match="100x5000"):
        imaging.check_size(info, 200, 4000, "CYX")


def test_detect_format(tmp_path):
    (tmp_path / "a.bmp").write_bytes(b"BM" + bytes(40))
    with pytest.raises(errors.UnsupportedFormat, match=".bmp"):
        imaging.detect_format(str(tmp_path / "a.bmp"))
    (tmp_path / "fake.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(errors.BadImage, match="not a valid TIFF"):
        imaging.detect_format(str(tmp_path / "fake.tif"))


def test_watershed_of_nothing_is_empty_and_of_two_blobs_is_two_labels():
    zeros = np.zeros((32, 32), np.float32)
    assert not deep_watershed(zeros, zeros).any()
    yy, xx = np.mgrid[:40, :80]
    inner = np.maximum(np.clip(1 - np.hypot(yy - 20, xx - 20) / 12, 0, 1),
                       np.clip(1 - np.hypot(yy - 20, xx - 52) / 12, 0, 1)).astype(np.float32)
    fg = (inner > 0).astype(np.float32)
    labels = label_batch(inner[None, ..., None], fg[None, ..., None])
    assert labels.shape == (1, 40, 80) and labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]


def test_result_stem_is_safe():
    assert results.result_stem("dir/My Cells (1).tif") == "My_Cells_1"
    assert results.result_stem("../../..") == "image"


def test_reasons_are_one_line():
    assert errors.reason_for(errors.JobError("bad\n  thing")) == "bad thing"
    assert errors.reason_for(ValueError("x" * 1000)).startswith("internal error (ValueError): x")
    assert len(errors.reason_for(ValueError("x" * 1000))) <= errors.REASON_LIMIT
    assert "not found" in errors.reason_for(FileNotFoundError(2, "No such file", "in.tif"))


def test_sentinel_hosts_parse():
    assert parse_sentinel_hosts("a:1, b ,") == [("a", 1), ("b", 26379)]
    with pytest.raises(SettingsError, match="REDIS_SENTINEL_HOSTS"):
        parse_sentinel_hosts("a:x")


def test_password_protected_redis():
    server = RedisServer().start()
    try:
        server.client().config_set("requirepass", "s3cret")
        env = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(server.port)}
        assert connect(load_settings({**env, "REDIS_PASSWORD": "s3cret"}).redis_config()).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(load_settings(env).redis_config()).ping()
    finally:
        server.cleanup()


def test_worker_log_lines_show_job_values_escaped_and_capped(capsys):
    """A job key with a newline and ESC cannot forge a second log line or colour the terminal."""
    import logging

    from kiosk_worker.__main__ import ARG_LIMIT, _setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        _setup_logging("INFO", as_json=False)
        logging.getLogger("kiosk_worker.test").warning("skipping %s: %s", "q:a\nFAKE LINE\x1b[31m", "x" * 5000)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "\\nFAKE LINE\\x1b[31m" in err and "\x1b" not in err
    assert len(err) < ARG_LIMIT + 200
