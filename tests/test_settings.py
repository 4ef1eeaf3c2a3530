"""Worker settings: the Kiosk table's names and defaults, and one-line errors for bad values."""

from __future__ import annotations

import pytest

from kiosk_protocol.settings import ENV_NAMES, SettingsError, load_settings

KIOSK_TABLE = {
    "QUEUE": ("queue", "predict"),
    "CONSUMER_TYPE": ("consumer_type", "image"),
    "CLOUD_PROVIDER": ("cloud_provider", "gke"),
    "GCLOUD_STORAGE_BUCKET": ("gcloud_storage_bucket", "default-bucket"),
    "INTERVAL": ("interval", 5),
    "REDIS_HOST": ("redis_host", "redis-master"),
    "REDIS_PORT": ("redis_port", 6379),
    "REDIS_TIMEOUT": ("redis_timeout", 3),
    "EMPTY_QUEUE_TIMEOUT": ("empty_queue_timeout", 5),
    "EXPIRE_TIME": ("expire_time", 3600),
    "METADATA_EXPIRE_TIME": ("metadata_expire_time", 30),
    "TF_HOST": ("tf_host", "tf-serving"),
    "TF_PORT": ("tf_port", 8500),
    "TF_TENSOR_NAME": ("tf_tensor_name", "image"),
    "GRPC_TIMEOUT": ("grpc_timeout", 30),
    "GRPC_BACKOFF": ("grpc_backoff", 3),
    "MAX_RETRY": ("max_retry", 5),
}


@pytest.mark.parametrize("env", sorted(KIOSK_TABLE))
def test_kiosk_defaults(env: str) -> None:
    attr, default = KIOSK_TABLE[env]
    assert env in ENV_NAMES
    assert getattr(load_settings({}), attr) == default


def test_values_are_parsed() -> None:
    settings = load_settings({"REDIS_PORT": "7000", "GRPC_TIMEOUT": "1.5", "REDIS_TLS": "true"})
    assert (settings.redis_port, settings.grpc_timeout, settings.redis_tls) == (7000, 1.5, True)


def test_seed_style_bucket_resolves() -> None:
    assert load_settings({}).bucket_url == "gs://default-bucket"
    aws = load_settings({"CLOUD_PROVIDER": "aws", "GCLOUD_STORAGE_BUCKET": "lab"})
    assert aws.bucket_url == "s3://lab"


def test_new_style_bucket_wins() -> None:
    settings = load_settings({"STORAGE_BUCKET": "s3://data/", "CLOUD_PROVIDER": "gke"})
    assert settings.bucket_url == "s3://data"


def test_consumer_aliases_and_queue_list() -> None:
    settings = load_settings({"CONSUMER_TYPE": "caliban", "QUEUE": "track, track-zip"})
    assert settings.consumer == "tracking"
    assert settings.queues == ["track", "track-zip"]
    assert load_settings({}).consumer == "segmentation"


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("REDIS_PORT", "abc", "not a valid number"),
        ("REDIS_PORT", "70000", "port number"),
        ("MAX_RETRY", "-1", "zero or more"),
        ("GRPC_TIMEOUT", "0", "greater than zero"),
        ("CLOUD_PROVIDER", "azure", "one of aws, gcp, gke"),
        ("STORAGE_BUCKET", "ftp://x", "gs://, s3:// or file://"),
        ("REDIS_TLS", "maybe", "true or false"),
        ("QUEUE", "  ", "must not be empty"),
        ("LOG_LEVEL", "loud", "one of"),
        ("TRACK_MAX_GAP", "-2", "zero or more"),
    ],
)
def test_bad_value_names_the_variable(env: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({env: value})
    message = str(info.value)
    assert message.startswith(f"invalid setting {env}=")
    assert fragment in message
    assert "\n" not in message
