"""Build the worker's Redis client from Settings: plain, password, TLS or Sentinel.

Responses are decoded to ``str`` (custom consumers call ``self.redis.hgetall``
as upstream did). The socket timeout covers the longest blocking pop
(EMPTY_QUEUE_TIMEOUT) plus REDIS_TIMEOUT, so a BLMOVE that legitimately waits
is never mistaken for a dead connection.

Through Sentinel, every new connection asks the Sentinels for the master, and a
connection still open to a demoted master fails (READONLY or killed by Sentinel)
and is retried, so a failover costs a reconnect, not the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import SSLConnection
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from kiosk_worker.settings import Settings, SettingsError

__all__ = ["client_kwargs", "connect", "parse_sentinel_hosts", "sentinel_kwargs", "tls_kwargs"]


def parse_sentinel_hosts(text: str, default_port: int = 26379) -> list[tuple[str, int]]:
    """'host1:26379,host2' -> [(host1, 26379), (host2, 26379)]."""
    hosts = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        try:
            number = int(port) if port else default_port
        except ValueError:
            number = -1
        if not 0 < number < 65536 or not (host or part).strip():
            raise SettingsError(
                f"invalid setting REDIS_SENTINEL_HOSTS={text!r}: bad host:port '{part}'")
        hosts.append((host or part, number))
    return hosts


def _readable(variable: str, path: str) -> str:
    if not Path(path).is_file():
        raise SettingsError(f"invalid setting {variable}={path!r}: no such file")
    return path


def tls_kwargs(settings: Settings) -> dict[str, Any]:
    """redis-py TLS options (server verified against REDIS_TLS_CA_FILE or the system CAs)."""
    files = {"REDIS_TLS_CA_FILE": settings.redis_tls_ca_file,
             "REDIS_TLS_CERT_FILE": settings.redis_tls_cert_file,
             "REDIS_TLS_KEY_FILE": settings.redis_tls_key_file}
    if not settings.redis_tls:
        named = [name for name, value in files.items() if value]
        if named:
            raise SettingsError(f"invalid setting {named[0]}={files[named[0]]!r}: REDIS_TLS is not true")
        return {}
    if bool(settings.redis_tls_cert_file) != bool(settings.redis_tls_key_file):
        missing = "REDIS_TLS_KEY_FILE" if settings.redis_tls_cert_file else "REDIS_TLS_CERT_FILE"
        raise SettingsError(f"invalid setting {missing}='': needed with its certificate/key partner")
    kwargs: dict[str, Any] = {"ssl": True}
    if settings.redis_tls_ca_file:
        kwargs["ssl_ca_certs"] = _readable("REDIS_TLS_CA_FILE", settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file:
        kwargs["ssl_certfile"] = _readable("REDIS_TLS_CERT_FILE", settings.redis_tls_cert_file)
        kwargs["ssl_keyfile"] = _readable("REDIS_TLS_KEY_FILE", settings.redis_tls_key_file)
    return kwargs


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
    kwargs.update(tls_kwargs(settings))
    return kwargs


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Sentinel(Sentinel):
    """redis-py's Sentinel, whose 'no master' error says what each Sentinel answered, in one line."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        problems = []
        for index, sentinel in enumerate(self.sentinels):
            kw = sentinel.connection_pool.connection_kwargs
            where = f"{kw.get('host')}:{kw.get('port')}"
            try:
                masters = sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                problems.append(f"{where} {_one_line(exc)}")
                continue
            except redis.ResponseError as exc:  # e.g. a plain Redis, not a Sentinel
                problems.append(f"{where} is not a Sentinel ({_one_line(exc)})")
                continue
            state = masters.get(service_name)
            if state is None:
                known = ", ".join(sorted(masters)) or "none"
                problems.append(f"{where} does not monitor {service_name!r} (it monitors: {known})")
            elif not self.check_master_state(state, service_name):
                problems.append(f"{where} reports master {service_name!r} down")
            else:
                # The Sentinel that answered is asked first next time.
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                return state["ip"], state["port"]
        raise MasterNotFoundError(
            f"no Redis master {service_name!r} from REDIS_SENTINEL_HOSTS: " + "; ".join(problems))


class _MasterConnection(SentinelManagedConnection):
    """A connection to the Sentinel-named master that treats 'demoted while blocked' as lost.

    When a master becomes a replica, Redis answers a pending BLMOVE with an ``UNBLOCKED``
    error (a ResponseError); like the READONLY case redis-py already handles, it means
    "reconnect through Sentinel", so it becomes a ConnectionError, which callers retry.
    """

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if self.connection_pool.is_master and str(exc).startswith("UNBLOCKED"):
                self.disconnect()
                raise redis.ConnectionError(f"the master was demoted during a blocking command ({exc})") from None
            raise


class _MasterSSLConnection(_MasterConnection, SSLConnection):
    pass


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Options for talking to the Sentinels themselves: same TLS, their own password."""
    kwargs: dict[str, Any] = {"socket_connect_timeout": settings.redis_timeout,
                              "socket_timeout": settings.redis_timeout,
                              # One quick retry per Sentinel: the next Sentinel is the real fallback
                              # (redis-py's default would spend seconds on a dead one).
                              "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1)}
    password = settings.redis_sentinel_password
    if password is None:
        password = settings.redis_password
    if password:
        kwargs["password"] = password
    kwargs.update(tls_kwargs(settings))
    return kwargs


def connect(settings: Settings) -> redis.Redis:
    """A client for the master: through Sentinel if REDIS_SENTINEL_HOSTS is set.

    Nothing is contacted yet; bad settings raise SettingsError (one line, naming the variable),
    unreachable servers raise redis.ConnectionError on first use.
    """
    kwargs = client_kwargs(settings)
    if settings.redis_sentinel_hosts.strip():
        hosts = parse_sentinel_hosts(settings.redis_sentinel_hosts)
        if not hosts:
            raise SettingsError(
                f"invalid setting REDIS_SENTINEL_HOSTS={settings.redis_sentinel_hosts!r}: names no host")
        sentinel = _Sentinel(hosts, sentinel_kwargs=sentinel_kwargs(settings), **kwargs)
        connection_class = _MasterSSLConnection if settings.redis_tls else _MasterConnection
        return sentinel.master_for(settings.redis_sentinel_master, connection_class=connection_class)
    return redis.Redis(host=settings.redis_host, port=settings.redis_port, **kwargs)
