"""A Redis client from a RedisConfig: plain, password, TLS or Sentinel (worker, operator, CLI).

Responses are decoded to ``str`` (custom consumers call ``self.redis.hgetall``
as upstream did). The socket timeout covers the longest blocking pop
(EMPTY_QUEUE_TIMEOUT) plus REDIS_TIMEOUT, so a BLMOVE that legitimately waits
is never mistaken for a dead connection.

Through Sentinel, every new connection asks the Sentinels for the master, and a
connection still open to a demoted master fails (READONLY or killed by Sentinel)
and is retried, so a failover costs a reconnect, not the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import SSLConnection
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from kiosk_protocol.errors import ConfigError, describe

__all__ = ["RedisConfig", "client_kwargs", "connect", "parse_sentinel_hosts",
           "sentinel_kwargs", "tls_kwargs"]


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis is and how to talk to it. Field names follow the REDIS_* variables."""

    host: str = "redis-master"
    port: int = 6379
    password: str = ""
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    sentinel_hosts: str = ""
    sentinel_master: str = "mymaster"
    #: None: the Sentinels get the Redis password (Bitnami's chart shares it); "": send none.
    sentinel_password: str | None = None
    #: Connect and reply timeout (REDIS_TIMEOUT).
    timeout: float = 3.0
    #: The longest blocking pop (EMPTY_QUEUE_TIMEOUT), added to the socket timeout.
    block_timeout: float = 0.0

    @property
    def where(self) -> str:
        """For error messages: host:port, or the Sentinels and master name."""
        if self.sentinel_hosts.strip():
            return f"sentinel {self.sentinel_hosts} ({self.sentinel_master})"
        return f"{self.host}:{self.port}"


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
            raise ConfigError(
                f"invalid setting REDIS_SENTINEL_HOSTS={text!r}: bad host:port '{part}'")
        hosts.append((host or part, number))
    return hosts


def _readable(variable: str, path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"invalid setting {variable}={path!r}: no such file")
    return path


def tls_kwargs(config: RedisConfig) -> dict[str, Any]:
    """redis-py TLS options (server verified against REDIS_TLS_CA_FILE or the system CAs)."""
    files = {"REDIS_TLS_CA_FILE": config.tls_ca_file,
             "REDIS_TLS_CERT_FILE": config.tls_cert_file,
             "REDIS_TLS_KEY_FILE": config.tls_key_file}
    if not config.tls:
        named = [name for name, value in files.items() if value]
        if named:
            raise ConfigError(f"invalid setting {named[0]}={files[named[0]]!r}: REDIS_TLS is not true")
        return {}
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        missing = "REDIS_TLS_KEY_FILE" if config.tls_cert_file else "REDIS_TLS_CERT_FILE"
        raise ConfigError(f"invalid setting {missing}='': needed with its certificate/key partner")
    kwargs: dict[str, Any] = {"ssl": True}
    if config.tls_ca_file:
        kwargs["ssl_ca_certs"] = _readable("REDIS_TLS_CA_FILE", config.tls_ca_file)
    if config.tls_cert_file:
        kwargs["ssl_certfile"] = _readable("REDIS_TLS_CERT_FILE", config.tls_cert_file)
        kwargs["ssl_keyfile"] = _readable("REDIS_TLS_KEY_FILE", config.tls_key_file)
    return kwargs


def client_kwargs(config: RedisConfig) -> dict[str, Any]:
    """Connection options shared by direct and Sentinel-managed clients."""
    kwargs: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": config.timeout,
        "socket_timeout": config.timeout + config.block_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        # Bounded, jittered retries of single commands on connection errors.
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), 3),
    }
    if config.password:
        kwargs["password"] = config.password
    kwargs.update(tls_kwargs(config))
    return kwargs


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
                problems.append(f"{where} {describe(exc, 200)}")
                continue
            except redis.ResponseError as exc:  # e.g. a plain Redis, not a Sentinel
                problems.append(f"{where} is not a Sentinel ({describe(exc, 200)})")
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


def sentinel_kwargs(config: RedisConfig) -> dict[str, Any]:
    """Options for talking to the Sentinels themselves: same TLS, their own password."""
    kwargs: dict[str, Any] = {"socket_connect_timeout": config.timeout,
                              "socket_timeout": config.timeout,
                              # One quick retry per Sentinel: the next Sentinel is the real fallback
                              # (redis-py's default would spend seconds on a dead one).
                              "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1)}
    password = config.sentinel_password
    if password is None:
        password = config.password
    if password:
        kwargs["password"] = password
    kwargs.update(tls_kwargs(config))
    return kwargs


def connect(config: RedisConfig) -> redis.Redis:
    """A client for the master: through Sentinel if REDIS_SENTINEL_HOSTS is set.

    Nothing is contacted yet; bad settings raise ConfigError (one line, naming the variable),
    unreachable servers raise redis.ConnectionError on first use.
    """
    kwargs = client_kwargs(config)
    if config.sentinel_hosts.strip():
        hosts = parse_sentinel_hosts(config.sentinel_hosts)
        if not hosts:
            raise ConfigError(
                f"invalid setting REDIS_SENTINEL_HOSTS={config.sentinel_hosts!r}: names no host")
        sentinel = _Sentinel(hosts, sentinel_kwargs=sentinel_kwargs(config), **kwargs)
        connection_class = _MasterSSLConnection if config.tls else _MasterConnection
        return sentinel.master_for(config.sentinel_master, connection_class=connection_class)
    return redis.Redis(host=config.host, port=config.port, **kwargs)
