"""A Redis client from a RedisConfig: plain, password, TLS or Sentinel (worker, operator, CLI).

Responses are decoded to ``str`` (custom consumers call ``self.redis.hgetall``
as upstream did). The socket timeout covers the longest blocking pop
(EMPTY_QUEUE_TIMEOUT) plus REDIS_TIMEOUT, so a BLMOVE that legitimately waits
is never mistaken for a dead connection.

Through Sentinel, every new connection asks the Sentinels for the master, and a
connection still open to a demoted master fails (READONLY or killed by Sentinel)
and is retried, so a failover costs a reconnect, not the worker.

Without REDIS_SENTINEL_HOSTS, REDIS_HOST:REDIS_PORT may itself be a Sentinel (kiosk-console
sets ``redis:26379``): every new connection asks it ``SENTINEL MASTERS`` first, as the Kiosk
consumer did. A Sentinel names the master, and from then on it is the Sentinel mode above; a
plain Redis answers with an error, and the address is the master itself. Pooled connections
are reused without asking, so a plain Redis pays one extra round trip per new connection only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from kiosk_protocol.errors import ConfigError, describe

__all__ = ["DEFAULT_MASTER", "RedisConfig", "choose_master", "client_kwargs", "connect",
           "parse_sentinel_hosts", "sentinel_kwargs", "tls_kwargs"]

log = logging.getLogger(__name__)

#: The master name used when REDIS_SENTINEL_MASTER is unset and a Sentinel monitors several.
DEFAULT_MASTER = "mymaster"


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
    #: "" (REDIS_SENTINEL_MASTER unset): the master the Sentinel monitors if it monitors one,
    #: else DEFAULT_MASTER; see choose_master.
    sentinel_master: str = ""
    #: None: the Sentinels get the Redis password (Bitnami's chart shares it); "": send none.
    sentinel_password: str | None = None
    #: Connect and reply timeout (REDIS_TIMEOUT).
    timeout: float = 3.0
    #: The longest blocking pop (EMPTY_QUEUE_TIMEOUT), added to the socket timeout.
    block_timeout: float = 0.0
    #: Without sentinel_hosts: find out on each new connection whether host:port is a
    #: Sentinel (REDIS_SENTINEL_DETECT); False: it is always the Redis server itself.
    sentinel_detect: bool = True

    @property
    def where(self) -> str:
        """For error messages: host:port, or the Sentinels and master name."""
        if self.sentinel_hosts.strip():
            name = f" ({self.sentinel_master})" if self.sentinel_master else ""
            return f"sentinel {self.sentinel_hosts}{name}"
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


def choose_master(masters: Mapping[str, Any], name: str) -> tuple[str, Any]:
    """The (name, state) to use from a Sentinel's ``SENTINEL MASTERS`` answer.

    ``name`` set (REDIS_SENTINEL_MASTER): that one. Unset: the only master monitored, else
    DEFAULT_MASTER if monitored. Otherwise LookupError saying what the Sentinel monitors.
    """
    known = ", ".join(sorted(masters)) or "none"
    if name:
        if name in masters:
            return name, masters[name]
        raise LookupError(f"does not monitor {name!r} (it monitors: {known})")
    if len(masters) == 1:
        return next(iter(masters.items()))
    if DEFAULT_MASTER in masters:
        return DEFAULT_MASTER, masters[DEFAULT_MASTER]
    if not masters:
        raise LookupError("monitors no master")
    raise LookupError(f"monitors several masters ({known}), none named {DEFAULT_MASTER!r}: "
                      "set REDIS_SENTINEL_MASTER")


def _named(name: str) -> str:
    return f" {name!r}" if name else ""


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
            try:
                name, state = choose_master(masters, service_name)
            except LookupError as exc:
                problems.append(f"{where} {exc}")
                continue
            if not self.check_master_state(state, name):
                problems.append(f"{where} reports master {name!r} down")
            else:
                # The Sentinel that answered is asked first next time.
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                return state["ip"], state["port"]
        raise MasterNotFoundError(
            f"no Redis master{_named(service_name)} from REDIS_SENTINEL_HOSTS: " + "; ".join(problems))


class _SentinelOrRedis(Sentinel):
    """REDIS_HOST:REDIS_PORT as a maybe-Sentinel, asked on every new connection (never per command).

    A Sentinel's answer names the master (chosen by choose_master); a plain Redis answers
    ``SENTINEL MASTERS`` with an error reply (unknown command; as in the Kiosk consumer, any
    error reply counts), which means "this address is the master". Errors reaching the address
    (refused, timeout, wrong password, TLS) propagate unchanged, exactly as a direct
    connection's would, and the connection retries them as it retries any connect.
    """

    def __init__(self, address: tuple[str, int], **kwargs: Any) -> None:
        super().__init__([address], **kwargs)
        self.address = address
        self._seen: object = None
        self._lock = threading.Lock()

    def _note(self, seen: object, level: int, message: str, *args: object) -> None:
        """Log what the address turned out to be, when that changes (not per connection)."""
        with self._lock:
            changed, self._seen = seen != self._seen, seen
        if changed:
            log.log(level, message, *args)

    def discover_master(self, service_name: str) -> tuple[str, int]:
        where = "{}:{}".format(*self.address)
        try:
            masters = self.sentinels[0].sentinel_masters()
        except redis.ResponseError as exc:  # not a Sentinel (connection errors are not ResponseErrors)
            self._note(self.address, logging.DEBUG, "Redis at %s (REDIS_HOST:REDIS_PORT; not a Sentinel: %s)",
                       where, describe(exc, 120))
            return self.address
        try:
            name, state = choose_master(masters, service_name)
        except LookupError as exc:
            raise MasterNotFoundError(
                f"no Redis master{_named(service_name)}: the Sentinel at REDIS_HOST:REDIS_PORT={where} "
                f"{exc}") from None
        if not self.check_master_state(state, name):
            raise MasterNotFoundError(
                f"no Redis master: the Sentinel at REDIS_HOST:REDIS_PORT={where} reports master {name!r} down")
        master = (state["ip"], state["port"])
        self._note((name, master), logging.INFO,
                   "Redis master %r at %s:%s, named by the Sentinel at %s (REDIS_HOST:REDIS_PORT)",
                   name, *master, where)
        return master


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


def sentinel_kwargs(config: RedisConfig, retries: int = 1) -> dict[str, Any]:
    """Options for talking to the Sentinels themselves: same TLS, their own password.

    ``retries``: one quick retry per Sentinel by default (the next Sentinel is the real fallback;
    redis-py's default would spend seconds on a dead one); none for the maybe-Sentinel at
    REDIS_HOST:REDIS_PORT, whose connection already retries (a dead address costs what it did).
    """
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries) if retries else Retry(NoBackoff(), 0)
    kwargs: dict[str, Any] = {"socket_connect_timeout": config.timeout,
                              "socket_timeout": config.timeout,
                              "retry": retry}
    password = config.sentinel_password
    if password is None:
        password = config.password
    if password:
        kwargs["password"] = password
    kwargs.update(tls_kwargs(config))
    return kwargs


def connect(config: RedisConfig) -> redis.Redis:
    """A client for the master: through the Sentinels of REDIS_SENTINEL_HOSTS if set, else
    through REDIS_HOST:REDIS_PORT if that is a Sentinel (asked per new connection), else there.

    Nothing is contacted yet; bad settings raise ConfigError (one line, naming the variable),
    unreachable servers raise redis.ConnectionError on first use.
    """
    kwargs = client_kwargs(config)
    sentinel: Sentinel
    if config.sentinel_hosts.strip():
        hosts = parse_sentinel_hosts(config.sentinel_hosts)
        if not hosts:
            raise ConfigError(
                f"invalid setting REDIS_SENTINEL_HOSTS={config.sentinel_hosts!r}: names no host")
        sentinel = _Sentinel(hosts, sentinel_kwargs=sentinel_kwargs(config), **kwargs)
    elif config.sentinel_detect:
        sentinel = _SentinelOrRedis((config.host, config.port),
                                    sentinel_kwargs=sentinel_kwargs(config, retries=0), **kwargs)
    else:
        return redis.Redis(host=config.host, port=config.port, **kwargs)
    connection_class = _MasterSSLConnection if config.tls else _MasterConnection
    return sentinel.master_for(config.sentinel_master, connection_class=connection_class)
