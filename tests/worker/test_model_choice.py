"""Model choice, channels, scale and dimension orders as the Kiosk reads them (pure units).

Expected values come from the Kiosk's settings table and ``kiosk_upstream`` (a restatement
of kiosk-redis-consumer's rules), not from the worker's code.
"""

from __future__ import annotations

import numpy as np
import pytest
from kiosk_upstream import DEFAULT_CHOICES, FRONTEND_ORDERS, upstream_bxyc, upstream_steps

from kiosk_protocol.settings import ENV_NAMES, SettingsError, load_settings
from kiosk_worker import errors, imaging, model_choice

#: kiosk-redis-consumer redis_consumer/settings.py (a183af9): variable -> (attribute, default).
KIOSK_DEFAULTS = {
    "NUCLEAR_MODEL": ("nuclear_model", "NuclearSegmentation:6"),
    "CYTOPLASM_MODEL": ("cytoplasm_model", "CytoplasmSegmentation:5"),
    "PHASE_MODEL": ("phase_model", "PhaseCytoSegmentation:0"),
    "MULTIPLEX_MODEL": ("multiplex_model", "MultiplexSegmentation:9"),
    "MESMER_COMPARTMENT": ("mesmer_compartment", "whole-cell"),
    "TRACKING_MODEL": ("tracking_model", "NuclearTrackingInf:6"),
    "NEIGHBORHOOD_ENCODER": ("neighborhood_encoder", "NuclearTrackingNE:6"),
    "POLARIS_MODEL": ("polaris_model", "SpotDetection:3"),
    "POLARIS_THRESHOLD": ("polaris_threshold", 0.95),
    "POLARIS_CLIP": ("polaris_clip", False),
    "POLARIS_SCALE": ("polaris_scale", 0.38),
    "LABEL_DETECT_MODEL": ("label_detect_model", "LabelDetection:1"),
    "LABEL_DETECT_ENABLED": ("label_detect_enabled", False),
    "SCALE_DETECT_MODEL": ("scale_detect_model", "ScaleDetection:1"),
    "SCALE_DETECT_ENABLED": ("scale_detect_enabled", False),
    "MAX_SCALE": ("max_scale", 10),
    "MAX_DISTANCE": ("max_distance", 50),
    "TRACK_LENGTH": ("track_length", 8),
    "DIVISION": ("division", 0.9),
    "BIRTH": ("birth", 0.99),
    "DEATH": ("death", 0.99),
    "APPEARANCE_DIM": ("appearance_dim", 32),
    "CROP_MODE": ("crop_mode", "resize"),
    "CALIBAN_NORM": ("caliban_norm", True),
}


@pytest.mark.parametrize("env", sorted(KIOSK_DEFAULTS))
def test_kiosk_defaults(env: str) -> None:
    attr, default = KIOSK_DEFAULTS[env]
    assert env in ENV_NAMES
    assert getattr(load_settings({}), attr) == default


def test_defaults_that_follow_other_variables() -> None:
    settings = load_settings({})
    assert [(m.name, int(m.version)) for m in model_choice.model_choices(settings)] == list(DEFAULT_CHOICES)
    assert str(model_choice.mesmer_model(settings)) == "MultiplexSegmentation:9"
    assert str(model_choice.tracking_model(settings)) == "NuclearTrackingInf:6"
    assert model_choice.scale_range(settings) == (0.1, 10)
    assert {"MESMER_MODEL", "CALIBAN_MODEL", "MIN_SCALE"} <= set(ENV_NAMES)
    changed = load_settings({"MULTIPLEX_MODEL": "Old:2", "TRACKING_MODEL": "Track:4", "MAX_SCALE": "4"})
    assert str(model_choice.mesmer_model(changed)) == "Old:2"  # MESMER_MODEL defaults to it
    assert str(model_choice.tracking_model(changed)) == "Track:4"  # CALIBAN_MODEL defaults to it
    assert model_choice.scale_range(changed) == (0.25, 4)  # MIN_SCALE = 1 / MAX_SCALE
    own = load_settings({"MULTIPLEX_MODEL": "Old:2", "MESMER_MODEL": "Mesmer:7", "CALIBAN_MODEL": "Cal:1",
                         "MIN_SCALE": "0.5"})
    assert (str(model_choice.mesmer_model(own)), model_choice.mesmer_model(own).source) == ("Mesmer:7", "MESMER_MODEL")
    assert str(model_choice.tracking_model(own)) == "Cal:1"
    assert model_choice.scale_range(own) == (0.5, 10)


@pytest.mark.parametrize(("env", "value", "fragment"), [
    ("NUCLEAR_MODEL", "NuclearSegmentation", "Name:version"),
    ("CYTOPLASM_MODEL", "Cyto:latest", "whole-number version"),
    ("PHASE_MODEL", ":3", "Name:version"),
    ("MESMER_MODEL", "Mesmer:1.5", "Name:version"),
    ("CALIBAN_MODEL", "Caliban:-1", "Name:version"),
    ("SCALE_DETECT_MODEL", "a:1:2", "Name:version"),
    ("MAX_SCALE", "0", "greater than zero"),
    ("MAX_SCALE", "nan", "finite"),
    ("MIN_SCALE", "-1", "zero or more"),
    ("MESMER_COMPARTMENT", "cells", "one of both, nuclear, whole-cell"),
    ("LABEL_DETECT_ENABLED", "maybe", "true or false"),
    ("TRACK_LENGTH", "0", "greater than zero"),
    ("CROP_MODE", " ", "must not be empty"),
])
def test_bad_values_name_the_variable_in_one_line(env: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({env: value})
    message = str(info.value)
    assert message.startswith(f"invalid setting {env}=") and fragment in message and "\n" not in message


def test_model_references_are_normalised() -> None:
    settings = load_settings({"NUCLEAR_MODEL": " MyNuclear : 07 ", "MESMER_MODEL": ""})
    assert settings.nuclear_model == "MyNuclear:7"
    assert str(model_choice.mesmer_model(settings)) == "MultiplexSegmentation:9"


# --- plan ---------------------------------------------------------------------------------------


def steps_of(job: dict[str, str], image_channels: int, **env: str) -> list[tuple[str, str, int | None]]:
    plan = model_choice.plan(job, load_settings(env), image_channels)
    return [(step.model.name, step.model.version, step.channel) for step in plan]


@pytest.mark.parametrize(("channels", "image_channels"), [
    ("0,", 1), (",0", 1), ("0,1,", 2), ("1,0", 2), (",1", 2), ("0,,1", 2), ("0,1,2", 3), ("0,0", 2),
])
def test_a_job_without_a_model_runs_a_model_per_channel_position(channels: str, image_channels: int) -> None:
    expected = [(DEFAULT_CHOICES[pos][0], str(DEFAULT_CHOICES[pos][1]), ch) for pos, ch in upstream_steps(channels)]
    assert steps_of({"model_name": "", "model_version": "", "channels": channels}, image_channels) == expected


def test_environment_models_and_a_named_model() -> None:
    job = {"model_name": "", "channels": "0,,1"}
    assert steps_of(job, 2, NUCLEAR_MODEL="N:3", PHASE_MODEL="P:2") == [("N", "3", 0), ("P", "2", 1)]
    named = {"model_name": "mine", "model_version": "4", "channels": "0,"}
    assert steps_of(named, 2, NUCLEAR_MODEL="N:3") == [("mine", "4", None)]
    assert steps_of({"model_name": "mine", "model_version": ""}, 1) == [("mine", "", None)]
    # No channels: channel 0 through NUCLEAR_MODEL (upstream would fail such a job).
    assert steps_of({"channels": ""}, 3) == [("NuclearSegmentation", "6", 0)]
    sources = [s.model.source for s in model_choice.plan({"channels": "0,1"}, load_settings({}), 2)]
    assert sources == ["NUCLEAR_MODEL", "CYTOPLASM_MODEL"]


@pytest.mark.parametrize(("channels", "image_channels", "error", "fragment"), [
    ("0,0", 1, errors.ModelMismatch, "the image has 1 channel(s) but channels '0,0' names 2"),
    ("0,3", 2, errors.ModelMismatch, "asks for channel 3 but the image has 2"),
    (",,,0", 4, errors.JobError, "position 3, which has no model"),
    (",", 1, errors.JobError, "names no channel"),
    ("0,x", 2, errors.BadImage, "comma-separated channel numbers"),
    ("-1,", 2, errors.BadImage, "negative"),
])
def test_bad_channels(channels: str, image_channels: int, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        model_choice.plan({"channels": channels}, load_settings({}), image_channels)
    assert fragment in str(info.value)


# --- scale --------------------------------------------------------------------------------------


def test_scale_as_upstream() -> None:
    settings = load_settings({})
    assert model_choice.image_scale("", settings) == 1
    assert model_choice.image_scale(None, settings) == 1
    assert model_choice.image_scale("2", settings) == 2
    assert model_choice.image_scale("0.1", settings) == 0.1
    assert model_choice.image_scale("10", settings) == 10
    for bad, fragment in [("10.5", "outside the valid range [0.1, 10]"), ("0.09", "outside"),
                          ("0", "outside"), ("-2", "outside"), ("inf", "outside"), ("nan", "outside"),
                          ("x", "not a number")]:
        with pytest.raises(errors.JobError, match=fragment.replace("[", r"\[")):
            model_choice.image_scale(bad, settings)
    detecting = load_settings({"SCALE_DETECT_ENABLED": "true"})
    with pytest.raises(errors.JobError, match="SCALE_DETECT_ENABLED"):
        model_choice.image_scale("", detecting)
    assert model_choice.image_scale("3", detecting) == 3


def test_rescale_and_labels_back() -> None:
    image = np.zeros((2, 10, 6, 1), np.float32)
    image[:, 2:5, 1:3] = 1
    up = imaging.rescale(image, 2.5)
    assert up.shape == (2, 25, 15, 1) and up.dtype == np.float32
    assert imaging.rescale(image, 1) is image
    assert imaging.rescale(image, 0.5).shape == (2, 5, 3, 1)
    with pytest.raises(errors.BadImage, match="to nothing"):
        imaging.rescale(image, 0.05)
    with pytest.raises(errors.ImageTooLarge, match="25x15"):
        imaging.rescale(image, 2.5, 20, 20)
    labels = np.arange(25 * 15, dtype=np.int32).reshape(1, 25, 15)
    back = imaging.resize_labels(labels, 10, 6)
    assert back.shape == (1, 10, 6) and set(np.unique(back)) <= set(np.unique(labels))
    blocks = np.kron(np.arange(6, dtype=np.int32).reshape(1, 3, 2), np.ones((1, 4, 4), np.int32))
    assert np.array_equal(imaging.resize_labels(blocks, 3, 2), np.arange(6).reshape(1, 3, 2))


# --- dimension orders ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", FRONTEND_ORDERS)
def test_every_frontend_order_is_read_as_upstream_reads_it(order: str) -> None:
    sizes = dict(zip("BXYC", (3, 7, 5, 2), strict=True))
    array = np.arange(np.prod([sizes[a] for a in order])).reshape([sizes[a] for a in order])
    assert np.array_equal(imaging.to_nhwc(array, order), upstream_bxyc(array, order))
    for rank in (2, 3, 4):
        if rank != len(order):
            with pytest.raises(errors.BadImage, match=f"dimension_order '{order}' has {len(order)} axes"):
                imaging.to_nhwc(np.zeros((4,) * rank), order)


def test_our_orders_keep_the_file_orientation_too() -> None:
    array = np.arange(2 * 7 * 5).reshape(2, 7, 5)
    assert np.array_equal(imaging.to_nhwc(array, "ZYX"), upstream_bxyc(array, "BXY"))
    assert np.array_equal(imaging.to_nhwc(array, "CYX"), upstream_bxyc(array, "CXY"))
    last = array.transpose(1, 2, 0)
    assert np.array_equal(imaging.to_nhwc(last, "YXC"), upstream_bxyc(last, "XYC"))


def test_header_sizes_follow_the_file_orientation() -> None:
    info = imaging.ImageInfo("tiff", (300, 100))
    imaging.check_size(info, 300, 100, "XY")  # first axis is the height, as upstream checks it
    with pytest.raises(errors.ImageTooLarge, match="300x100"):
        imaging.check_size(info, 100, 300, "XY")
    png = imaging.ImageInfo("png", (30, 20))  # a grayscale PNG has a channel axis for 3 letters
    imaging.check_size(png, 30, 20, "XYB")
    with pytest.raises(errors.BadImage, match="has 4 axes"):
        imaging.check_size(png, 30, 20, "BXYC")
    assert imaging.frame_count((4, 30, 20, 2), "BXYC") == 4 and imaging.frame_count((30, 20, 5), "XYB") == 5
