"""Build the worker's Redis client from Settings: plain, password, TLS or Sentinel.

Responses are decoded to ``str`` (custom consumers call ``self.redis.hgetall``
as upstream did). The socket timeout covers the longest blocking pop
(EMPTY_QUEUE_TIMEOUT) plus REDIS_TIMEOUT, so a BLMOVE that legitimately waits
is never mistaken for a dead connection.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from kiosk_worker.settings import Settings, SettingsError

__all__ = ["client_kwargs", "connect", "parse_sentinel_hosts"]


def parse_sentinel_hosts(text: str, default_port: int = 26379) -> list[tuple[str, int]]:
    """'host1:26379,host2' -> [(host1, 26379), (host2, 26379)]."""
    hosts = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        try:
            hosts.append((host or part, int(port) if port else default_port))
        except ValueError:
            raise SettingsError(
                f"invalid setting REDIS_SENTINEL_HOSTS={text!r}: bad port in '{part}'") from None
    return hosts


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options shared by direct and Sentinel-managed clients."""
    kwargs: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": settings.redis_timeout,
        "socket_timeout": settings.redis_timeout + settings.empty_queue_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        # Bounded, jittered retries of single commands on connection errors.
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), 3),
    }
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    if settings.redis_tls:
        kwargs["ssl"] = True
    return kwargs


def connect(settings: Settings) -> redis.Redis:
    """A client for the master: through Sentinel if REDIS_SENTINEL_HOSTS is set."""
    kwargs = client_kwargs(settings)
    if settings.redis_sentinel_hosts.strip():
        from redis.sentinel import Sentinel

        sentinel_kwargs = {"socket_connect_timeout": settings.redis_timeout,
                           "socket_timeout": settings.redis_timeout}
        if settings.redis_password:
            sentinel_kwargs["password"] = settings.redis_password
        if settings.redis_tls:
            sentinel_kwargs["ssl"] = True
        sentinel = Sentinel(parse_sentinel_hosts(settings.redis_sentinel_hosts),
                            sentinel_kwargs=sentinel_kwargs, **kwargs)
        return sentinel.master_for(settings.redis_sentinel_master, **kwargs)
    return redis.Redis(host=settings.redis_host, port=settings.redis_port, **kwargs)
