"""Kiosk settings from environment variables (worker, CLI, local mode).

The Kiosk consumer's table (names and defaults) is honoured unchanged; ours are
added beside it. A bad value stops the worker at start with one line naming the
variable, instead of a traceback deep inside a job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kiosk_protocol.envparse import (
    _APPLICATIONS,
    CLOUD_PROVIDERS,
    _application_models,
    _bool,
    _bucket,
    _bucket_name,
    _choice,
    _finite,
    _model_ref,
    _nonempty,
    _optional_model_ref,
    _port,
    _positive,
    _pp_number,
    _provider,
)
from kiosk_protocol.errors import ConfigError
from kiosk_protocol.redis_config import RedisConfig

T = TypeVar("T")


#: An environment variable has a value that cannot be used (one line naming it).
SettingsError = ConfigError


CONSUMER_ALIASES = {"image": "segmentation", "caliban": "tracking"}


@dataclass(frozen=True)
class Settings:
    # --- the Kiosk consumer's table ---
    queue: str = "predict"
    consumer_type: str = "image"
    cloud_provider: str = "gke"
    gcloud_storage_bucket: str = "default-bucket"
    interval: float = 10.0
    redis_host: str = "redis-master"
    redis_port: int = 6379
    redis_timeout: float = 3.0
    empty_queue_timeout: float = 5.0
    expire_time: int = 3600
    metadata_expire_time: int = 30
    tf_host: str = "tf-serving"
    tf_port: int = 8500
    tf_tensor_name: str = "image"
    grpc_timeout: float = 30.0
    grpc_backoff: float = 3.0
    max_retry: int = 5
    # --- the Kiosk consumer's newer variables (kiosk-redis-consumer settings.py, upstream defaults) ---
    max_image_frames: int = 60
    tf_min_model_size: int = 128
    do_nothing_timeout: float = 0.5
    storage_max_backoff: float = 60.0
    aws_region: str = "us-east-1"
    #: "" = unset (boto3's own credential chain; the Kiosk's placeholder was "specify_me").
    aws_access_key_id: str = field(default="", repr=False)
    aws_secret_access_key: str = field(default="", repr=False)
    #: The pod name Kubernetes sets; WORKER_NAME defaults to it ("" = unset).
    hostname: str = ""
    segmentation_queue: str = "predict"
    #: Seed-era bucket names, chosen by CLOUD_PROVIDER ("" = unset); see bucket_url.
    gke_bucket: str = ""
    aws_s3_bucket: str = ""
    # --- ours ---
    storage_bucket: str = ""
    storage_endpoint: str = ""
    storage_public: bool = False
    signed_url_expiry: int = 7 * 24 * 3600
    redis_password: str = ""
    redis_tls: bool = False
    redis_sentinel_hosts: str = ""
    #: "" = unset: the only master the Sentinel monitors, else "mymaster" (redis_config.choose_master).
    redis_sentinel_master: str = ""
    #: Without REDIS_SENTINEL_HOSTS, ask REDIS_HOST:REDIS_PORT whether it is a Sentinel.
    redis_sentinel_detect: bool = True
    #: None: the Sentinels get REDIS_PASSWORD (Bitnami's chart shares it); "": send none.
    redis_sentinel_password: str | None = None
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    worker_name: str = ""
    heartbeat_interval: float = 2.0
    grace_period: float = 25.0
    max_jobs: int = 0
    tf_max_batch_size: int = 64
    grpc_max_message_bytes: int = 512 * 1024 * 1024
    max_image_height: int = 2048
    max_image_width: int = 2048
    max_zip_members: int = 1000
    max_zip_bytes: int = 2 * 1024 * 1024 * 1024
    max_field_bytes: int = 8192  # = kiosk_protocol.fields.MAX_FIELD_BYTES
    track_max_gap: int = 2
    storage_max_retry: int = 5
    storage_backoff: float = 0.5
    log_level: str = "INFO"
    log_json: bool = False
    metrics_port: int = 0
    # --- the Kiosk consumer's model choice, scale and tracking variables (same names and
    # defaults as kiosk-redis-consumer's settings.py; read by kiosk_worker.model_choice) ---
    nuclear_model: str = "NuclearSegmentation:6"
    cytoplasm_model: str = "CytoplasmSegmentation:5"
    phase_model: str = "PhaseCytoSegmentation:0"
    multiplex_model: str = "MultiplexSegmentation:9"
    #: "" = MULTIPLEX_MODEL (the Kiosk's default for MESMER_MODEL).
    mesmer_model: str = ""
    mesmer_compartment: str = "whole-cell"
    tracking_model: str = "NuclearTrackingInf:6"
    #: "" = TRACKING_MODEL (the Kiosk's default for CALIBAN_MODEL).
    caliban_model: str = ""
    neighborhood_encoder: str = "NuclearTrackingNE:6"
    polaris_model: str = "SpotDetection:3"
    polaris_threshold: float = 0.95
    polaris_clip: bool = False
    polaris_scale: float = 0.38
    label_detect_model: str = "LabelDetection:1"
    label_detect_enabled: bool = False
    scale_detect_model: str = "ScaleDetection:1"
    scale_detect_enabled: bool = False
    max_scale: float = 10.0
    #: None = 1 / MAX_SCALE (the Kiosk's default for MIN_SCALE).
    min_scale: float | None = None
    max_distance: int = 50
    track_length: int = 8
    division: float = 0.9
    birth: float = 0.99
    death: float = 0.99
    appearance_dim: int = 32
    crop_mode: str = "resize"
    caliban_norm: bool = True

    # --- deep-watershed post-processing (kiosk_worker.postprocess; a pool's spec.worker.postprocess):
    # deepcell-toolbox deep_watershed's parameters with its defaults, as POSTPROCESS_<NAME> ---
    postprocess_radius: int = 10
    postprocess_maxima_threshold: float = 0.1
    postprocess_interior_threshold: float = 0.01
    postprocess_maxima_smooth: float = 0.0
    postprocess_interior_smooth: float = 1.0
    postprocess_maxima_index: int = 0
    postprocess_interior_index: int = -1
    postprocess_label_erosion: int = 0
    postprocess_small_objects_threshold: int = 0
    postprocess_fill_holes_threshold: int = 0
    postprocess_pixel_expansion: int = 0
    postprocess_maxima_algorithm: str = "h_maxima"
    postprocess_exclude_border: bool = False

    # --- deepcell application pipeline around the model (kiosk_worker.pipeline) ---
    application: str = "auto"       # APPLICATION: auto (by model name), nuclear, cytoplasm, mesmer, none
    application_models: str = ""    # APPLICATION_MODELS: Name=family,... (wins over APPLICATION)

    # --- hostile jobs: resource caps checked before the work they bound ---
    #: Decoded pixel bytes of one input image (every frame), from its header, before decoding.
    max_decoded_bytes: int = 1024 * 1024 * 1024
    #: Object size checked (HEAD / stat) before a download.
    max_input_bytes: int = 1024 * 1024 * 1024
    #: Takes of one job (START) before it ends failed: "worker died N times on this job".
    max_attempts: int = 3  # = kiosk_protocol.fields.MAX_ATTEMPTS
    #: Entries of a job's ``channels`` list.
    max_channel_entries: int = 64
    #: Cells (labels) of one frame a tracking job may have.
    max_cells_per_frame: int = 2048

    def redis_config(self) -> RedisConfig:
        """The REDIS_* settings; the socket timeout covers the longest blocking pop."""
        return RedisConfig(
            host=self.redis_host, port=self.redis_port, password=self.redis_password, tls=self.redis_tls,
            tls_ca_file=self.redis_tls_ca_file, tls_cert_file=self.redis_tls_cert_file,
            tls_key_file=self.redis_tls_key_file, sentinel_hosts=self.redis_sentinel_hosts,
            sentinel_master=self.redis_sentinel_master, sentinel_password=self.redis_sentinel_password,
            timeout=self.redis_timeout, block_timeout=self.empty_queue_timeout,
            sentinel_detect=self.redis_sentinel_detect,
        )

    @property
    def queues(self) -> list[str]:
        """QUEUE may name several queues, comma-separated; the first one is preferred."""
        return [q.strip() for q in self.queue.split(",") if q.strip()]

    @property
    def consumer(self) -> str:
        kind = self.consumer_type.strip().lower()
        return CONSUMER_ALIASES.get(kind, kind)

    @property
    def bucket_url(self) -> str:
        """One storage URL: STORAGE_BUCKET=gs://x, else CLOUD_PROVIDER + a bucket name, which is
        the seed-era GKE_BUCKET (gke/gcp) or AWS_S3_BUCKET (aws) when set, else GCLOUD_STORAGE_BUCKET."""
        if self.storage_bucket:
            return self.storage_bucket
        scheme = CLOUD_PROVIDERS[self.cloud_provider.lower()]
        seed_era = self.aws_s3_bucket if scheme == "s3" else self.gke_bucket
        return f"{scheme}://{seed_era or self.gcloud_storage_bucket}"


_SPEC: dict[str, tuple[str, Callable[[str], Any]]] = {}


def _register(env: str, attr: str, parse: Callable[[str], Any]) -> None:
    _SPEC[env] = (attr, parse)


for _env, _attr, _parse in [
    ("QUEUE", "queue", _nonempty),
    ("CONSUMER_TYPE", "consumer_type", _nonempty),
    ("CLOUD_PROVIDER", "cloud_provider", _provider),
    ("GCLOUD_STORAGE_BUCKET", "gcloud_storage_bucket", _nonempty),
    ("INTERVAL", "interval", _positive(float, allow_zero=True)),
    ("REDIS_HOST", "redis_host", _nonempty),
    ("REDIS_PORT", "redis_port", _port),
    ("REDIS_TIMEOUT", "redis_timeout", _positive(float)),
    ("EMPTY_QUEUE_TIMEOUT", "empty_queue_timeout", _positive(float)),
    ("EXPIRE_TIME", "expire_time", _positive(int, allow_zero=True)),
    ("METADATA_EXPIRE_TIME", "metadata_expire_time", _positive(int, allow_zero=True)),
    ("TF_HOST", "tf_host", _nonempty),
    ("TF_PORT", "tf_port", _port),
    ("TF_TENSOR_NAME", "tf_tensor_name", _nonempty),
    ("GRPC_TIMEOUT", "grpc_timeout", _positive(float)),
    ("GRPC_BACKOFF", "grpc_backoff", _positive(float, allow_zero=True)),
    ("MAX_RETRY", "max_retry", _positive(int, allow_zero=True)),
    ("MAX_IMAGE_FRAMES", "max_image_frames", _positive(int)),
    ("TF_MIN_MODEL_SIZE", "tf_min_model_size", _positive(int)),
    ("DO_NOTHING_TIMEOUT", "do_nothing_timeout", _positive(float, allow_zero=True)),
    ("STORAGE_MAX_BACKOFF", "storage_max_backoff", _positive(float, allow_zero=True)),
    ("AWS_REGION", "aws_region", lambda s: s.strip() or "us-east-1"),  # empty = unset, as the S3 backend reads it
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id", str.strip),
    ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", str.strip),
    ("HOSTNAME", "hostname", str.strip),
    ("SEGMENTATION_QUEUE", "segmentation_queue", _nonempty),
    ("GKE_BUCKET", "gke_bucket", _bucket_name),
    ("AWS_S3_BUCKET", "aws_s3_bucket", _bucket_name),
    ("STORAGE_BUCKET", "storage_bucket", _bucket),
    ("STORAGE_ENDPOINT", "storage_endpoint", str),
    ("STORAGE_PUBLIC", "storage_public", _bool),
    ("SIGNED_URL_EXPIRY", "signed_url_expiry", _positive(int)),
    ("REDIS_PASSWORD", "redis_password", str),
    ("REDIS_TLS", "redis_tls", _bool),
    ("REDIS_SENTINEL_HOSTS", "redis_sentinel_hosts", str),
    ("REDIS_SENTINEL_MASTER", "redis_sentinel_master", _nonempty),
    ("REDIS_SENTINEL_PASSWORD", "redis_sentinel_password", str),
    ("REDIS_SENTINEL_DETECT", "redis_sentinel_detect", _bool),
    ("REDIS_TLS_CA_FILE", "redis_tls_ca_file", str.strip),
    ("REDIS_TLS_CERT_FILE", "redis_tls_cert_file", str.strip),
    ("REDIS_TLS_KEY_FILE", "redis_tls_key_file", str.strip),
    ("WORKER_NAME", "worker_name", str),
    ("HEARTBEAT_INTERVAL", "heartbeat_interval", _positive(float)),
    ("GRACE_PERIOD", "grace_period", _positive(float, allow_zero=True)),
    ("MAX_JOBS", "max_jobs", _positive(int, allow_zero=True)),
    ("TF_MAX_BATCH_SIZE", "tf_max_batch_size", _positive(int)),
    ("GRPC_MAX_MESSAGE_BYTES", "grpc_max_message_bytes", _positive(int)),
    ("MAX_IMAGE_HEIGHT", "max_image_height", _positive(int)),
    ("MAX_IMAGE_WIDTH", "max_image_width", _positive(int)),
    ("MAX_ZIP_MEMBERS", "max_zip_members", _positive(int)),
    ("MAX_ZIP_BYTES", "max_zip_bytes", _positive(int)),
    ("MAX_FIELD_BYTES", "max_field_bytes", _positive(int)),
    ("TRACK_MAX_GAP", "track_max_gap", _positive(int, allow_zero=True)),
    ("STORAGE_MAX_RETRY", "storage_max_retry", _positive(int, allow_zero=True)),
    ("STORAGE_BACKOFF", "storage_backoff", _positive(float, allow_zero=True)),
    ("LOG_LEVEL", "log_level", lambda s: _choice(s.upper(), {"DEBUG", "INFO", "WARNING", "ERROR"})),
    ("LOG_JSON", "log_json", _bool),
    ("METRICS_PORT", "metrics_port", _positive(int, allow_zero=True)),
]:
    _register(_env, _attr, _parse)


# The Kiosk consumer's model choice, scale and tracking variables (kiosk_worker.model_choice).
for _env, _attr, _parse in [
    ("NUCLEAR_MODEL", "nuclear_model", _model_ref),
    ("CYTOPLASM_MODEL", "cytoplasm_model", _model_ref),
    ("PHASE_MODEL", "phase_model", _model_ref),
    ("MULTIPLEX_MODEL", "multiplex_model", _model_ref),
    ("MESMER_MODEL", "mesmer_model", _optional_model_ref),
    ("MESMER_COMPARTMENT", "mesmer_compartment",
     lambda s: _choice(s.strip().lower(), {"whole-cell", "nuclear", "both"})),
    ("TRACKING_MODEL", "tracking_model", _model_ref),
    ("CALIBAN_MODEL", "caliban_model", _optional_model_ref),
    ("NEIGHBORHOOD_ENCODER", "neighborhood_encoder", _optional_model_ref),  # empty: overlap tracker
    ("POLARIS_MODEL", "polaris_model", _model_ref),
    ("POLARIS_THRESHOLD", "polaris_threshold", _finite(_positive(float, allow_zero=True))),
    ("POLARIS_CLIP", "polaris_clip", _bool),
    ("POLARIS_SCALE", "polaris_scale", _finite(_positive(float))),
    ("LABEL_DETECT_MODEL", "label_detect_model", _model_ref),
    ("LABEL_DETECT_ENABLED", "label_detect_enabled", _bool),
    ("SCALE_DETECT_MODEL", "scale_detect_model", _model_ref),
    ("SCALE_DETECT_ENABLED", "scale_detect_enabled", _bool),
    ("MAX_SCALE", "max_scale", _finite(_positive(float))),
    ("MIN_SCALE", "min_scale", _finite(_positive(float, allow_zero=True))),
    ("MAX_DISTANCE", "max_distance", _positive(int)),
    ("TRACK_LENGTH", "track_length", _positive(int)),
    ("DIVISION", "division", _finite(_positive(float, allow_zero=True))),
    ("BIRTH", "birth", _finite(_positive(float, allow_zero=True))),
    ("DEATH", "death", _finite(_positive(float, allow_zero=True))),
    ("APPEARANCE_DIM", "appearance_dim", _positive(int)),
    ("CROP_MODE", "crop_mode", _nonempty),
    ("CALIBAN_NORM", "caliban_norm", _bool),
]:
    _register(_env, _attr, _parse)


# Deep-watershed post-processing (kiosk_worker.postprocess.WatershedParams.from_settings).
for _env, _attr, _parse in [
    ("POSTPROCESS_RADIUS", "postprocess_radius", _positive(int)),
    ("POSTPROCESS_MAXIMA_THRESHOLD", "postprocess_maxima_threshold", _pp_number(0.0)),
    ("POSTPROCESS_INTERIOR_THRESHOLD", "postprocess_interior_threshold", _pp_number()),
    ("POSTPROCESS_MAXIMA_SMOOTH", "postprocess_maxima_smooth", _pp_number(0.0)),
    ("POSTPROCESS_INTERIOR_SMOOTH", "postprocess_interior_smooth", _pp_number(0.0)),
    ("POSTPROCESS_MAXIMA_INDEX", "postprocess_maxima_index", int),
    ("POSTPROCESS_INTERIOR_INDEX", "postprocess_interior_index", int),
    ("POSTPROCESS_LABEL_EROSION", "postprocess_label_erosion", _positive(int, allow_zero=True)),
    ("POSTPROCESS_SMALL_OBJECTS_THRESHOLD", "postprocess_small_objects_threshold", _positive(int, allow_zero=True)),
    ("POSTPROCESS_FILL_HOLES_THRESHOLD", "postprocess_fill_holes_threshold", _positive(int, allow_zero=True)),
    ("POSTPROCESS_PIXEL_EXPANSION", "postprocess_pixel_expansion", _positive(int, allow_zero=True)),
    ("POSTPROCESS_MAXIMA_ALGORITHM", "postprocess_maxima_algorithm",
     lambda s: _choice(s.strip().lower(), {"h_maxima", "peak_local_max"})),
    ("POSTPROCESS_EXCLUDE_BORDER", "postprocess_exclude_border", _bool),
]:
    _register(_env, _attr, _parse)


# The deepcell application around the model call (kiosk_worker.pipeline.application_for).


_register("APPLICATION", "application", lambda s: _choice(s.strip().lower() or "auto", _APPLICATIONS))
_register("APPLICATION_MODELS", "application_models", _application_models)


# Hostile jobs: resource caps (kiosk_worker.imaging, kiosk_storage, JobStore.start, tracking).
for _env, _attr, _parse in [
    ("MAX_DECODED_BYTES", "max_decoded_bytes", _positive(int)),
    ("MAX_INPUT_BYTES", "max_input_bytes", _positive(int)),
    ("MAX_ATTEMPTS", "max_attempts", _positive(int)),
    ("MAX_CHANNEL_ENTRIES", "max_channel_entries", _positive(int)),
    ("MAX_CELLS_PER_FRAME", "max_cells_per_frame", _positive(int)),
]:
    _register(_env, _attr, _parse)


ENV_NAMES: tuple[str, ...] = tuple(_SPEC)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read every known variable; raise SettingsError naming the first bad one."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for env, (attr, parse) in _SPEC.items():
        if env not in environ:
            continue
        raw = environ[env]
        try:
            values[attr] = parse(raw)
        except ValueError as exc:
            number = "invalid literal" in str(exc) or "could not convert" in str(exc)  # int() / float()
            reason = str(exc) if str(exc) and not number else "not a valid number"
            raise SettingsError(f"invalid setting {env}={raw!r}: {reason}") from None
    values.update(overrides)
    settings = Settings(**values)
    if not settings.storage_bucket and settings.cloud_provider not in CLOUD_PROVIDERS:
        raise SettingsError(f"invalid setting CLOUD_PROVIDER={settings.cloud_provider!r}")
    return settings
