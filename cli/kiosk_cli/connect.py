"""Connections from flags and the Kiosk environment variables (one settings source).

Flags override the environment; the environment is read by the shared ``load_settings``
so REDIS_HOST, STORAGE_BUCKET, ... mean the same thing here as in a worker.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import redis

from kiosk_cli.errors import CliError
from kiosk_protocol import redis_config
from kiosk_protocol.errors import describe
from kiosk_protocol.settings import Settings, SettingsError, load_settings


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (default: the worker's environment variables)")
    group.add_argument("--redis-host", help="Redis host (REDIS_HOST, default redis-master)")
    group.add_argument("--redis-port", type=int, help="Redis port (REDIS_PORT, default 6379)")
    group.add_argument("--redis-password", help="Redis password (REDIS_PASSWORD)")
    group.add_argument(
        "--bucket", "-b", "--storage-bucket", dest="bucket",
        help="storage bucket: gs://NAME, s3://NAME or file:///DIR (STORAGE_BUCKET)",
    )
    group.add_argument("--storage-endpoint", help="S3/GCS endpoint URL for emulators (STORAGE_ENDPOINT)")


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Environment first, then flags on top; a bad value is a one-line CliError."""
    environ = dict(os.environ if environ is None else environ)
    flag_env = {
        "REDIS_HOST": getattr(args, "redis_host", None),
        "REDIS_PORT": getattr(args, "redis_port", None),
        "REDIS_PASSWORD": getattr(args, "redis_password", None),
        "STORAGE_BUCKET": getattr(args, "bucket", None),
        "STORAGE_ENDPOINT": getattr(args, "storage_endpoint", None),
    }
    environ.update({name: str(value) for name, value in flag_env.items() if value is not None})
    try:
        return load_settings(environ)
    except SettingsError as exc:
        raise CliError(str(exc)) from None


def redis_client(settings: Settings) -> redis.Redis:
    """A connected client (the worker's own connection code); unreachable Redis is a CliError."""
    config = settings.redis_config()
    where = config.where
    try:
        client = redis_config.connect(config)
        client.ping()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    except redis.AuthenticationError as exc:
        raise CliError(f"Redis at {where} refused the password: {describe(exc)}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise CliError(f"cannot reach Redis at {where}: {describe(exc)}") from None
    except redis.RedisError as exc:
        raise CliError(f"Redis at {where} failed: {describe(exc)}") from None
    return client


def storage_for(settings: Settings) -> Any:
    """The worker's storage backend for the configured bucket."""
    try:
        from kiosk_storage import get_storage
    except ImportError as exc:  # the storage libraries are not installed
        hint = "pip install 'kiosk-operator[cli]'"
        raise CliError(f"storage support is not installed ({exc}); {hint}") from None
    try:
        return get_storage(settings)
    except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
        raise CliError(f"cannot open bucket {settings.bucket_url}: {describe(exc)}") from None
