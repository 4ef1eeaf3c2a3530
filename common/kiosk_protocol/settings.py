"""Kiosk settings from environment variables (worker, CLI, local mode).

The Kiosk consumer's table (names and defaults) is honoured unchanged; ours are
added beside it. A bad value stops the worker at start with one line naming the
variable, instead of a traceback deep inside a job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kiosk_protocol.errors import ConfigError
from kiosk_protocol.redis_config import RedisConfig

T = TypeVar("T")


#: An environment variable has a value that cannot be used (one line naming it).
SettingsError = ConfigError


CONSUMER_ALIASES = {"image": "segmentation", "caliban": "tracking"}
CLOUD_PROVIDERS = {"gke": "gs", "gcp": "gs", "aws": "s3"}


@dataclass(frozen=True)
class Settings:
    # --- the Kiosk consumer's table ---
    queue: str = "predict"
    consumer_type: str = "image"
    cloud_provider: str = "gke"
    gcloud_storage_bucket: str = "default-bucket"
    interval: float = 5.0
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
    # --- ours ---
    storage_bucket: str = ""
    storage_endpoint: str = ""
    storage_public: bool = False
    signed_url_expiry: int = 7 * 24 * 3600
    redis_password: str = ""
    redis_tls: bool = False
    redis_sentinel_hosts: str = ""
    redis_sentinel_master: str = "mymaster"
    #: None: the Sentinels get REDIS_PASSWORD (Bitnami's chart shares it); "": send none.
    redis_sentinel_password: str | None = None
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    worker_name: str = ""
    heartbeat_interval: float = 2.0
    grace_period: float = 25.0
    max_jobs: int = 0
    tf_max_batch_size: int = 1
    grpc_max_message_bytes: int = 512 * 1024 * 1024
    max_image_height: int = 8192
    max_image_width: int = 8192
    max_zip_members: int = 1000
    max_zip_bytes: int = 2 * 1024 * 1024 * 1024
    track_max_gap: int = 2
    storage_max_retry: int = 5
    storage_backoff: float = 0.5
    log_level: str = "INFO"
    log_json: bool = False
    metrics_port: int = 0

    def redis_config(self) -> RedisConfig:
        """The REDIS_* settings; the socket timeout covers the longest blocking pop."""
        return RedisConfig(
            host=self.redis_host, port=self.redis_port, password=self.redis_password, tls=self.redis_tls,
            tls_ca_file=self.redis_tls_ca_file, tls_cert_file=self.redis_tls_cert_file,
            tls_key_file=self.redis_tls_key_file, sentinel_hosts=self.redis_sentinel_hosts,
            sentinel_master=self.redis_sentinel_master, sentinel_password=self.redis_sentinel_password,
            timeout=self.redis_timeout, block_timeout=self.empty_queue_timeout,
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
        """One storage URL from either style: STORAGE_BUCKET=gs://x or CLOUD_PROVIDER+bucket."""
        if self.storage_bucket:
            return self.storage_bucket
        scheme = CLOUD_PROVIDERS[self.cloud_provider.lower()]
        return f"{scheme}://{self.gcloud_storage_bucket}"


_SPEC: dict[str, tuple[str, Callable[[str], Any]]] = {}


def _register(env: str, attr: str, parse: Callable[[str], Any]) -> None:
    _SPEC[env] = (attr, parse)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _positive(parse: Callable[[str], T], allow_zero: bool = False) -> Callable[[str], T]:
    def check(text: str) -> T:
        value = parse(text)
        if value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
            raise ValueError("must be " + ("zero or more" if allow_zero else "greater than zero"))
        return value

    return check


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError("must be a port number between 1 and 65535")
    return value


def _bucket(text: str) -> str:
    text = text.strip()
    if text and not text.startswith(("gs://", "s3://", "file://")):
        raise ValueError("must start with gs://, s3:// or file://")
    return text.rstrip("/") if text not in ("file://",) else text


def _provider(text: str) -> str:
    if text.strip().lower() not in CLOUD_PROVIDERS:
        raise ValueError("must be one of " + ", ".join(sorted(CLOUD_PROVIDERS)))
    return text.strip().lower()


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


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
    ("STORAGE_BUCKET", "storage_bucket", _bucket),
    ("STORAGE_ENDPOINT", "storage_endpoint", str),
    ("STORAGE_PUBLIC", "storage_public", _bool),
    ("SIGNED_URL_EXPIRY", "signed_url_expiry", _positive(int)),
    ("REDIS_PASSWORD", "redis_password", str),
    ("REDIS_TLS", "redis_tls", _bool),
    ("REDIS_SENTINEL_HOSTS", "redis_sentinel_hosts", str),
    ("REDIS_SENTINEL_MASTER", "redis_sentinel_master", _nonempty),
    ("REDIS_SENTINEL_PASSWORD", "redis_sentinel_password", str),
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
    ("TRACK_MAX_GAP", "track_max_gap", _positive(int, allow_zero=True)),
    ("STORAGE_MAX_RETRY", "storage_max_retry", _positive(int, allow_zero=True)),
    ("STORAGE_BACKOFF", "storage_backoff", _positive(float, allow_zero=True)),
    ("LOG_LEVEL", "log_level", lambda s: _choice(s.upper(), {"DEBUG", "INFO", "WARNING", "ERROR"})),
    ("LOG_JSON", "log_json", _bool),
    ("METRICS_PORT", "metrics_port", _positive(int, allow_zero=True)),
]:
    _register(_env, _attr, _parse)


def _choice(value: str, allowed: set[str]) -> str:
    if value not in allowed:
        raise ValueError("must be one of " + ", ".join(sorted(allowed)))
    return value


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
            reason = str(exc) if str(exc) and "invalid literal" not in str(exc) else "not a valid number"
            raise SettingsError(f"invalid setting {env}={raw!r}: {reason}") from None
    values.update(overrides)
    settings = Settings(**values)
    if not settings.storage_bucket and settings.cloud_provider not in CLOUD_PROVIDERS:
        raise SettingsError(f"invalid setting CLOUD_PROVIDER={settings.cloud_provider!r}")
    return settings
