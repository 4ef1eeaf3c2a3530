"""Worker settings: the Kiosk table's names and defaults, and one-line errors for bad values."""

from __future__ import annotations

import pytest

from kiosk_protocol.settings import ENV_NAMES, SettingsError, load_settings

KIOSK_TABLE = {
    "QUEUE": ("queue", "predict"),
    "CONSUMER_TYPE": ("consumer_type", "image"),
    "CLOUD_PROVIDER": ("cloud_provider", "gke"),
    "GCLOUD_STORAGE_BUCKET": ("gcloud_storage_bucket", "default-bucket"),
    "INTERVAL": ("interval", 10),
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
    # Newer variables of kiosk-redis-consumer's settings.py, with its defaults.
    "MAX_IMAGE_HEIGHT": ("max_image_height", 2048),
    "MAX_IMAGE_WIDTH": ("max_image_width", 2048),
    "MAX_IMAGE_FRAMES": ("max_image_frames", 60),
    "TF_MAX_BATCH_SIZE": ("tf_max_batch_size", 64),
    "TF_MIN_MODEL_SIZE": ("tf_min_model_size", 128),
    "DO_NOTHING_TIMEOUT": ("do_nothing_timeout", 0.5),
    "STORAGE_MAX_BACKOFF": ("storage_max_backoff", 60),
    "AWS_REGION": ("aws_region", "us-east-1"),
    "SEGMENTATION_QUEUE": ("segmentation_queue", "predict"),
}

#: Kiosk names whose default differs from the Kiosk's on purpose (README says why).
DELIBERATE_DEFAULTS = {
    "AWS_ACCESS_KEY_ID": ("aws_access_key_id", ""),  # Kiosk: "specify_me"; unset = boto3's chain
    "AWS_SECRET_ACCESS_KEY": ("aws_secret_access_key", ""),  # likewise
    "HOSTNAME": ("hostname", ""),  # Kiosk: "host-unkonwn"; unset = WORKER_NAME falls back to worker-<pid>
    "GKE_BUCKET": ("gke_bucket", ""),  # seed era: "default-bucket"; unset = GCLOUD_STORAGE_BUCKET
    "AWS_S3_BUCKET": ("aws_s3_bucket", ""),  # likewise
    "REDIS_SENTINEL_MASTER": ("redis_sentinel_master", ""),  # unset = the only master, else mymaster
    "REDIS_SENTINEL_DETECT": ("redis_sentinel_detect", True),
}


@pytest.mark.parametrize("env", sorted({**KIOSK_TABLE, **DELIBERATE_DEFAULTS}))
def test_kiosk_defaults(env: str) -> None:
    attr, default = {**KIOSK_TABLE, **DELIBERATE_DEFAULTS}[env]
    assert env in ENV_NAMES
    assert getattr(load_settings({}), attr) == default


@pytest.mark.parametrize(
    ("env", "raw", "attr", "value"),
    [
        ("MAX_IMAGE_FRAMES", "120", "max_image_frames", 120),
        ("TF_MIN_MODEL_SIZE", "256", "tf_min_model_size", 256),
        ("DO_NOTHING_TIMEOUT", "0", "do_nothing_timeout", 0.0),
        ("STORAGE_MAX_BACKOFF", "7.5", "storage_max_backoff", 7.5),
        ("AWS_REGION", " eu-west-1 ", "aws_region", "eu-west-1"),
        ("AWS_REGION", "", "aws_region", "us-east-1"),  # empty is unset, as for the S3 backend
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE", "aws_access_key_id", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI", "aws_secret_access_key", "wJalrXUtnFEMI"),
        ("HOSTNAME", "segmentation-consumer-5d9c-x2k", "hostname", "segmentation-consumer-5d9c-x2k"),
        ("SEGMENTATION_QUEUE", "segmentation", "segmentation_queue", "segmentation"),
        ("GKE_BUCKET", "lab-data/", "gke_bucket", "lab-data"),
        ("AWS_S3_BUCKET", "lab-s3", "aws_s3_bucket", "lab-s3"),
        ("REDIS_SENTINEL_DETECT", "false", "redis_sentinel_detect", False),
        ("REDIS_SENTINEL_MASTER", " main ", "redis_sentinel_master", "main"),
        ("INTERVAL", "1", "interval", 1.0),
    ],
)
def test_new_variables_are_parsed(env: str, raw: str, attr: str, value: object) -> None:
    assert getattr(load_settings({env: raw}), attr) == value


def test_redis_config_carries_detection_and_the_master_name() -> None:
    config = load_settings({}).redis_config()
    assert (config.sentinel_detect, config.sentinel_master) == (True, "")
    config = load_settings({"REDIS_SENTINEL_DETECT": "no", "REDIS_SENTINEL_MASTER": "main"}).redis_config()
    assert (config.sentinel_detect, config.sentinel_master) == (False, "main")


def test_aws_credentials_stay_out_of_the_settings_repr() -> None:
    settings = load_settings({"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"})
    assert "wJalrXUtnFEMI" not in repr(settings) and "AKIDEXAMPLE" not in repr(settings)


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


SEED_ERA = {"GKE_BUCKET": "lab-gcs", "AWS_S3_BUCKET": "lab-s3"}  # kiosk-console set both


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({**SEED_ERA, "CLOUD_PROVIDER": "aws"}, "s3://lab-s3"),
        ({**SEED_ERA, "CLOUD_PROVIDER": "gke"}, "gs://lab-gcs"),
        ({**SEED_ERA, "CLOUD_PROVIDER": "gcp"}, "gs://lab-gcs"),
        ({**SEED_ERA}, "gs://lab-gcs"),  # CLOUD_PROVIDER defaults to gke
        # The seed-era names win over GCLOUD_STORAGE_BUCKET ...
        ({**SEED_ERA, "CLOUD_PROVIDER": "aws", "GCLOUD_STORAGE_BUCKET": "other"}, "s3://lab-s3"),
        ({"GKE_BUCKET": "lab-gcs", "GCLOUD_STORAGE_BUCKET": "other"}, "gs://lab-gcs"),
        # ... only the provider's own name counts, and an empty one is unset ...
        ({"CLOUD_PROVIDER": "aws", "GKE_BUCKET": "lab-gcs", "GCLOUD_STORAGE_BUCKET": "other"}, "s3://other"),
        ({"CLOUD_PROVIDER": "aws", "AWS_S3_BUCKET": "", "GCLOUD_STORAGE_BUCKET": "other"}, "s3://other"),
        ({"AWS_S3_BUCKET": "lab-s3"}, "gs://default-bucket"),
        # ... and STORAGE_BUCKET wins over all of them.
        ({**SEED_ERA, "CLOUD_PROVIDER": "aws", "STORAGE_BUCKET": "gs://new"}, "gs://new"),
    ],
)
def test_seed_era_bucket_names(env: dict[str, str], url: str) -> None:
    assert load_settings(env).bucket_url == url


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
        ("MAX_IMAGE_FRAMES", "0", "greater than zero"),
        ("MAX_IMAGE_FRAMES", "sixty", "not a valid number"),
        ("TF_MIN_MODEL_SIZE", "-128", "greater than zero"),
        ("DO_NOTHING_TIMEOUT", "-0.5", "zero or more"),
        ("STORAGE_MAX_BACKOFF", "soon", "not a valid number"),
        ("SEGMENTATION_QUEUE", "", "must not be empty"),
        ("GKE_BUCKET", "gs://lab", "without a scheme"),
        ("AWS_S3_BUCKET", "s3://lab", "without a scheme"),
        ("REDIS_SENTINEL_DETECT", "maybe", "true or false"),
        ("REDIS_SENTINEL_MASTER", " ", "must not be empty"),
        ("INTERVAL", "-1", "zero or more"),
    ],
)
def test_bad_value_names_the_variable(env: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({env: value})
    message = str(info.value)
    assert message.startswith(f"invalid setting {env}=")
    assert fragment in message
    assert "\n" not in message
