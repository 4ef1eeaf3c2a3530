"""The worker's Redis connection against real servers: TLS (CA, password, client certs) and Sentinel
(discovery, forced failover, master crash), a Sentinel found at REDIS_HOST:REDIS_PORT as kiosk-console
configures it, plus the one-line errors of bad settings."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from workerkit import run_batch, save_tiff, spawn_worker, submit, worker_env

import kiosk_protocol as protocol
from harness.ports import free_port
from harness.redis_server import LOCALHOST, RedisSentinel, RedisServer, SentinelGroup
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_model_server.synthetic import make_cells
from kiosk_protocol import JobStore
from kiosk_protocol.redis_config import DEFAULT_MASTER, choose_master, connect
from kiosk_protocol.settings import SettingsError, load_settings
from kiosk_worker.runner import Runner

QUEUE = "segmentation"


def _settings(env: dict[str, str], **extra: str):
    return load_settings({"REDIS_TIMEOUT": "2", "EMPTY_QUEUE_TIMEOUT": "0.3", **env, **extra}).redis_config()


def _pop_and_beat(client: redis.Redis, worker: str = "w-1") -> str:
    """Submit, pop and heartbeat through ``client``; returns the popped key."""
    key = protocol.submit_job(client, QUEUE, "in.tif", "segmentation", "1")
    store = JobStore(client, worker)
    assert store.pop(QUEUE, timeout=1) == key
    store.heartbeat([QUEUE], ttl=10, info={"state": "busy"})
    store.finish(QUEUE, key, {"status": "done"})
    return key


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    server = RedisServer(tls=True, password="tls-s3cret").start()
    yield server
    server.cleanup()


def test_tls_worker_runs_a_job_end_to_end(tls_server, model_server, bucket):
    """A real segmentation job, popped, heartbeated and finished over TLS with a password."""
    tls_server.client().flushall()
    image, _ = make_cells((64, 64), 4, seed=3)
    key = submit(tls_server.client(), save_tiff(bucket, "cells.tif", image))
    env = worker_env(tls_server, model_server, bucket, WORKER_NAME="tls-worker")
    assert env["REDIS_TLS"] == "true" and env["REDIS_TLS_CA_FILE"]
    runner = run_batch(load_settings(env))
    job = tls_server.client().hgetall(key)
    assert job["status"] == "done", job
    assert job["updated_by"] == "tls-worker"
    assert runner.stats.items_taken == 1


def test_tls_with_password_pop_and_heartbeat(tls_server):
    tls_server.client().flushall()
    client = connect(_settings(tls_server.env()))
    key = _pop_and_beat(client)
    direct = tls_server.client()
    assert direct.hget(key, "status") == "done"
    assert direct.zscore(protocol.workers_key(QUEUE), "w-1") is not None
    assert direct.hget(protocol.worker_info_key("w-1"), "state") == "busy"


def test_tls_wrong_password_and_plain_client_are_refused(tls_server):
    with pytest.raises(redis.AuthenticationError):
        connect(_settings(tls_server.env(), REDIS_PASSWORD="wrong")).ping()
    plain = {k: v for k, v in tls_server.env().items() if not k.startswith("REDIS_TLS")}
    with pytest.raises(redis.ConnectionError):
        connect(_settings(plain)).ping()


def test_tls_server_certificate_is_verified(tls_server):
    """Without our CA the system CAs do not trust the test certificate: no silent fallback."""
    env = {k: v for k, v in tls_server.env().items() if k != "REDIS_TLS_CA_FILE"}
    with pytest.raises(redis.ConnectionError, match="(?i)certificate verify failed"):
        connect(_settings(env)).ping()


def test_mutual_tls_needs_the_client_certificate():
    server = RedisServer(tls=True, tls_auth_clients=True).start()
    try:
        env = server.env()
        assert env["REDIS_TLS_CERT_FILE"] and env["REDIS_TLS_KEY_FILE"]
        client = connect(_settings(env))
        assert client.ping()
        _pop_and_beat(client)
        # The server really demands it (one attempt, no retries: the refusal itself is what counts).
        anonymous = server.client(ssl_certfile=None, ssl_keyfile=None, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError):
            anonymous.ping()
    finally:
        server.cleanup()


@pytest.mark.parametrize("env, variable", [
    ({"REDIS_TLS": "true", "REDIS_TLS_CA_FILE": "/nonexistent/ca.crt"}, "REDIS_TLS_CA_FILE"),
    ({"REDIS_TLS_CA_FILE": "/etc/hostname"}, "REDIS_TLS_CA_FILE"),  # TLS not enabled
    ({"REDIS_TLS": "true", "REDIS_TLS_CERT_FILE": "/etc/hostname"}, "REDIS_TLS_KEY_FILE"),
    ({"REDIS_TLS": "true", "REDIS_TLS_CERT_FILE": "/etc/hostname", "REDIS_TLS_KEY_FILE": "/nope.key"},
     "REDIS_TLS_KEY_FILE"),
    ({"REDIS_SENTINEL_HOSTS": "a:notaport"}, "REDIS_SENTINEL_HOSTS"),
    ({"REDIS_SENTINEL_HOSTS": "a:70000"}, "REDIS_SENTINEL_HOSTS"),
    ({"REDIS_SENTINEL_HOSTS": " , "}, "REDIS_SENTINEL_HOSTS"),
])
def test_bad_settings_are_one_line_errors(env, variable):
    with pytest.raises(SettingsError) as err:
        connect(_settings(env))
    message = str(err.value)
    assert variable in message and "\n" not in message, message


def test_worker_process_with_a_missing_ca_file_exits_with_one_line(model_server, bucket, tls_server):
    env = worker_env(tls_server, model_server, bucket, REDIS_TLS_CA_FILE="/nonexistent/ca.pem",
                     LOG_LEVEL="INFO")
    proc = spawn_worker(env, "--max-jobs", "1")
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and "REDIS_TLS_CA_FILE" in lines[0] and "Traceback" not in err, err


# --- Sentinel ----------------------------------------------------------------------------------


@pytest.fixture()
def replicated() -> Iterator[SentinelGroup]:
    setup = SentinelGroup(password="pw")
    yield setup
    setup.cleanup()


def test_sentinel_finds_the_master(replicated):
    env = replicated.sentinel.env()
    assert "REDIS_HOST" not in env and env["REDIS_SENTINEL_HOSTS"] == replicated.sentinel.address
    client = connect(_settings(env, REDIS_HOST="wrong-host-never-used"))
    key = _pop_and_beat(client)
    assert replicated.master.client().hget(key, "status") == "done"


def test_worker_follows_a_forced_failover(replicated, model_server, bucket):
    """A running worker finishes a job on the old master, then one on the promoted replica."""
    old = replicated.master
    env = worker_env(replicated.sentinel, model_server, bucket, WORKER_NAME="sentinel-worker",
                     EMPTY_QUEUE_TIMEOUT="0.3", HEARTBEAT_INTERVAL="0.2", REDIS_TIMEOUT="2")
    runner = Runner(load_settings(env))
    thread = threading.Thread(target=runner.run, name="worker", daemon=True)
    thread.start()
    try:
        image, _ = make_cells((48, 48), 3, seed=5)
        first = submit(old.client(), save_tiff(bucket, "a.tif", image))
        wait_for(lambda: old.client().hget(first, "status") == "done", 20, "job on the first master")

        # No CLIENT KILL: the worker must notice by itself (UNBLOCKED pop, READONLY heartbeat).
        new = replicated.failover(kill_clients=False)
        assert new is not old and old.role() == "slave"
        second = submit(new.client(), save_tiff(bucket, "b.tif", image))
        wait_for(lambda: new.client().hget(second, "status") == "done", 20, "job on the new master")
        # Heartbeats land on the new master too (the old one is a read-only replica now).
        beat = new.client().zscore(protocol.workers_key(QUEUE), "sentinel-worker")
        wait_for(lambda: new.client().zscore(protocol.workers_key(QUEUE), "sentinel-worker") > beat,
                 10, "a heartbeat on the new master")
    finally:
        runner.request_stop()
        thread.join(15)
    assert not thread.is_alive()
    assert runner.stats.items_taken == 2


def test_client_survives_the_master_crashing(replicated):
    """The master dies; Sentinel promotes the replica; the same client carries on there."""
    client = connect(_settings(replicated.sentinel.env()))
    _pop_and_beat(client)
    old = replicated.master
    old.stop()
    new = replicated.sentinel.wait_new_master(old.port, replicated.servers[1:], timeout=15)
    key = wait_for(lambda: _pop_and_beat(client, "w-2"), 15, "a job through the new master",
                   ignore=(redis.ConnectionError, redis.TimeoutError))
    assert new.client().hget(key, "status") == "done"


def test_sentinel_over_tls_with_password():
    setup = SentinelGroup(tls=True, password="pw")
    try:
        env = setup.sentinel.env()
        assert env["REDIS_TLS"] == "true" and env["REDIS_PASSWORD"] == "pw"
        key = _pop_and_beat(connect(_settings(env)))
        assert setup.master.client().hget(key, "status") == "done"
    finally:
        setup.cleanup()


def test_sentinel_with_its_own_password():
    """REDIS_SENTINEL_PASSWORD when the Sentinels' password differs from Redis's."""
    setup = SentinelGroup(password="pw", sentinel_password="sentinel-pw")
    try:
        env = setup.sentinel.env()
        assert env["REDIS_SENTINEL_PASSWORD"] == "sentinel-pw"
        assert connect(_settings(env)).ping()
        without = {k: v for k, v in env.items() if k != "REDIS_SENTINEL_PASSWORD"}
        with pytest.raises(redis.ConnectionError, match="no Redis master 'mymaster'") as err:
            connect(_settings(without)).ping()
        assert "password" in str(err.value).lower() and "\n" not in str(err.value)
    finally:
        setup.cleanup()


def test_passwordless_sentinel_in_front_of_a_password_master():
    """By default the Sentinels get REDIS_PASSWORD too, which one without a password accepts."""
    setup = SentinelGroup(password="pw", sentinel_password="")
    try:
        env = setup.sentinel.env()
        assert connect(_settings(env)).ping()
        default = {k: v for k, v in env.items() if k != "REDIS_SENTINEL_PASSWORD"}
        assert connect(_settings(default)).ping()
    finally:
        setup.cleanup()


def test_unreachable_sentinel_is_a_clear_one_line_error():
    port = free_port()
    client = connect(_settings({"REDIS_SENTINEL_HOSTS": f"127.0.0.1:{port}"}))
    with pytest.raises(redis.ConnectionError) as err:
        client.ping()
    message = str(err.value)
    assert "\n" not in message
    assert "no Redis master from REDIS_SENTINEL_HOSTS" in message  # REDIS_SENTINEL_MASTER unset
    assert f"127.0.0.1:{port}" in message and "refused" in message.lower()


def test_wrong_master_name_says_what_the_sentinel_monitors(replicated):
    client = connect(_settings(replicated.sentinel.env(), REDIS_SENTINEL_MASTER="other"))
    with pytest.raises(redis.ConnectionError) as err:
        client.ping()
    message = str(err.value)
    assert "does not monitor 'other' (it monitors: mymaster)" in message, message
    assert "\n" not in message


def test_plain_redis_given_as_a_sentinel(redis_server):
    client = connect(_settings({"REDIS_SENTINEL_HOSTS": redis_server.address}))
    with pytest.raises(redis.ConnectionError, match="is not a Sentinel"):
        client.ping()


# --- A Sentinel at REDIS_HOST:REDIS_PORT (kiosk-console: REDIS_HOST=redis, REDIS_PORT=26379) ----------


def _console_env(group: SentinelGroup) -> dict[str, str]:
    """What kiosk-console gives its consumers: REDIS_HOST/REDIS_PORT naming the Sentinel, and
    no REDIS_SENTINEL_* variable (TLS/password variables as the servers need them)."""
    assert group.sentinel is not None
    env = {**group.master.env(), "REDIS_HOST": LOCALHOST, "REDIS_PORT": str(group.sentinel.port)}
    assert not any(name.startswith("REDIS_SENTINEL") for name in env), env
    return env


def _server_at(env: dict[str, str]) -> SimpleNamespace:
    """A stand-in for workerkit.worker_env's server argument: only its env() is read."""
    return SimpleNamespace(env=lambda: dict(env))


@pytest.fixture()
def console() -> Iterator[SentinelGroup]:
    setup = SentinelGroup()
    yield setup
    setup.cleanup()


def test_worker_with_only_redis_host_and_port_at_a_sentinel_runs_jobs(console, model_server, bucket):
    """Before auto-detection this worker sent BLMOVE to the Sentinel, which has no such command."""
    env = worker_env(_server_at(_console_env(console)), model_server, bucket, WORKER_NAME="console-worker")
    master = console.master
    image, _ = make_cells((48, 48), 3, seed=11)
    keys = [submit(master.client(), save_tiff(bucket, f"c{i}.tif", image)) for i in range(2)]
    runner = run_batch(load_settings(env))
    assert runner.stats.items_taken == 2
    for key in keys:
        job = master.client().hgetall(key)
        assert job["status"] == "done" and job["updated_by"] == "console-worker", job


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_sentinel_at_redis_host_with_password(tls):
    """A password (shared by Sentinel and Redis, as Bitnami's chart does) and TLS work through it."""
    setup = SentinelGroup(tls=tls, password="pw")
    try:
        env = _console_env(setup)
        assert env["REDIS_PASSWORD"] == "pw" and (env.get("REDIS_TLS") == "true") == tls
        key = _pop_and_beat(connect(_settings(env)))
        assert setup.master.client().hget(key, "status") == "done"
    finally:
        setup.cleanup()


def test_failover_during_a_run_loses_no_job(console, bucket):
    """Jobs are in flight when the Sentinel promotes the replica; every one ends done on the new master."""
    slow = ModelServer(models=["segmentation"], latency_ms=150).start()
    old = console.master
    env = worker_env(_server_at(_console_env(console)), slow, bucket, WORKER_NAME="console-failover",
                     EMPTY_QUEUE_TIMEOUT="0.3", HEARTBEAT_INTERVAL="0.2", REDIS_TIMEOUT="2")
    runner = Runner(load_settings(env))
    thread = threading.Thread(target=runner.run, name="worker", daemon=True)
    try:
        image, _ = make_cells((48, 48), 3, seed=7)
        keys = [submit(old.client(), save_tiff(bucket, f"f{i}.tif", image)) for i in range(12)]
        thread.start()

        def done_on(server: RedisServer) -> int:
            with server.client(socket_timeout=2) as c:
                return sum(c.hget(key, "status") == "done" for key in keys)

        wait_for(lambda: done_on(old) >= 2, 30, "two jobs done before the failover")
        assert done_on(old) < len(keys), "the run ended before the failover: nothing was in flight"
        # No CLIENT KILL: the worker notices by itself (UNBLOCKED pop, READONLY write).
        new = console.failover(kill_clients=False)
        assert new is not old and old.role() == "slave"
        later = [submit(new.client(), save_tiff(bucket, f"g{i}.tif", image)) for i in range(2)]
        keys += later
        wait_for(lambda: done_on(new) == len(keys), 60, f"all {len(keys)} jobs done on the new master")
        with new.client() as c:
            assert c.llen(QUEUE) == 0
            assert c.llen(protocol.processing_key(QUEUE, "console-failover")) == 0
    finally:
        runner.request_stop()
        if thread.is_alive():
            thread.join(15)
        slow.stop(grace=0)
    assert not thread.is_alive()


def _server_stats(probe: redis.Redis) -> tuple[int, int]:
    """(connections accepted, error replies sent) by a Redis server so far."""
    stats = probe.info("stats")
    return int(stats["total_connections_received"]), int(stats["total_error_replies"])


def test_plain_redis_at_redis_host_is_probed_once_per_new_connection(redis_client, redis_server):
    """A plain Redis answers the probe with an error and is then used directly. The probe
    costs one round trip per new connection; pooled connections are reused without one."""
    probe = redis_server.client()  # one connection of our own, opened before counting
    base = _server_stats(probe)
    env = redis_server.env()
    detecting = connect(_settings(env))
    direct = connect(_settings(env, REDIS_SENTINEL_DETECT="false"))
    assert _server_stats(probe) == base, "connect() contacted the server"

    # One new connection each: the detecting client also asks SENTINEL MASTERS (an error reply),
    # over a connection of its own that later probes reuse.
    direct.ping()
    after_direct = _server_stats(probe)
    direct_errors = after_direct[1] - base[1]  # e.g. CLIENT SETINFO on an older server
    detecting.ping()
    after_detecting = _server_stats(probe)
    assert after_detecting[0] - after_direct[0] == 2
    assert after_detecting[1] - after_direct[1] == 2 * direct_errors + 1

    # The hot path: commands, scripts and blocking pops on the pooled connection, no probe
    # (one round first, so that loading the Lua scripts, NOSCRIPT replies included, is behind us).
    _pop_and_beat(detecting)
    warm = _server_stats(probe)
    for _ in range(50):
        _pop_and_beat(detecting)
    assert _server_stats(probe) == warm

    # A new connection (after a dropped one) is probed again, over the probe's open connection.
    detecting.connection_pool.disconnect()
    assert detecting.ping()
    again = _server_stats(probe)
    assert again[0] - warm[0] == 1
    assert again[1] - warm[1] == direct_errors + 1
    probe.close()


def test_unreachable_redis_host_is_the_same_error_as_before():
    """Nothing is contacted by connect(); the first command raises the connection error itself."""
    port = free_port()
    client = connect(_settings({"REDIS_HOST": LOCALHOST, "REDIS_PORT": str(port)}))
    with pytest.raises(redis.ConnectionError) as err:
        client.ping()
    message = str(err.value)
    assert f"{LOCALHOST}:{port}" in message and "refused" in message.lower() and "\n" not in message


def test_a_sentinel_that_appears_later_at_redis_host_is_found(console):
    """REDIS_HOST:REDIS_PORT is a plain Redis, then a Sentinel: the same client follows it."""
    plain = RedisServer().start()
    sentinel: RedisSentinel | None = None
    try:
        client = connect(_settings({"REDIS_HOST": LOCALHOST, "REDIS_PORT": str(plain.port)}))
        first = _pop_and_beat(client)
        assert plain.client().hget(first, "status") == "done"
        plain.stop()
        sentinel = RedisSentinel(console.master, port=plain.port).start(replicas=1)
        key = wait_for(lambda: _pop_and_beat(client, "w-2"), 15, "a job through the new Sentinel",
                       ignore=(redis.ConnectionError, redis.TimeoutError))
        assert console.master.client().hget(key, "status") == "done"
    finally:
        if sentinel is not None:
            sentinel.cleanup()
        plain.cleanup()


def test_detection_can_be_turned_off(console):
    """REDIS_SENTINEL_DETECT=false: the address is Redis itself, so a Sentinel there fails as before."""
    env = _console_env(console)
    with pytest.raises(redis.ResponseError, match="(?i)unknown command"):
        _pop_and_beat(connect(_settings(env, REDIS_SENTINEL_DETECT="false")))
    assert _pop_and_beat(connect(_settings(env)))


# --- The master name: REDIS_SENTINEL_MASTER, else the only one, else mymaster -------------------


def _state(port: int) -> dict[str, object]:
    return {"ip": LOCALHOST, "port": port, "is_master": True}


def test_choose_master_rules():
    one = {"data": _state(1)}
    several = {"a": _state(1), DEFAULT_MASTER: _state(2)}
    assert choose_master(one, "")[0] == "data"
    assert choose_master(several, "")[0] == DEFAULT_MASTER
    assert choose_master(several, "a")[0] == "a"
    with pytest.raises(LookupError, match=r"does not monitor 'b' \(it monitors: a, mymaster\)"):
        choose_master(several, "b")
    with pytest.raises(LookupError, match="monitors several masters \\(a, b\\).*REDIS_SENTINEL_MASTER"):
        choose_master({"b": _state(1), "a": _state(2)}, "")
    with pytest.raises(LookupError, match="monitors no master"):
        choose_master({}, "")


@pytest.fixture()
def other_master() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def _monitor(group: SentinelGroup, name: str, server: RedisServer) -> None:
    assert group.sentinel is not None
    with group.sentinel.client() as c:
        c.sentinel_monitor(name, LOCALHOST, server.port, 1)


@pytest.mark.parametrize("explicit", [False, True], ids=["REDIS_HOST", "REDIS_SENTINEL_HOSTS"])
def test_the_only_master_is_used_whatever_its_name(explicit):
    setup = SentinelGroup(replicas=0, name="kiosk")
    try:
        env = setup.sentinel.env() if explicit else _console_env(setup)
        env.pop("REDIS_SENTINEL_MASTER", None)
        key = _pop_and_beat(connect(_settings(env)))
        assert setup.master.client().hget(key, "status") == "done"
    finally:
        setup.cleanup()


def test_mymaster_is_chosen_among_several(console, other_master):
    _monitor(console, "aaa-first", other_master)
    key = _pop_and_beat(connect(_settings(_console_env(console))))
    assert console.master.client().hget(key, "status") == "done"
    assert not other_master.client().exists(key)


def test_redis_sentinel_master_picks_one_among_several(console, other_master):
    _monitor(console, "other", other_master)
    key = _pop_and_beat(connect(_settings(_console_env(console), REDIS_SENTINEL_MASTER="other")))
    assert other_master.client().hget(key, "status") == "done"
    assert not console.master.client().exists(key)


def test_several_masters_and_no_mymaster_is_a_one_line_error_naming_them(other_master):
    setup = SentinelGroup(replicas=0, name="first")
    try:
        _monitor(setup, "second", other_master)
        client = connect(_settings(_console_env(setup)))
        with pytest.raises(redis.ConnectionError) as err:
            client.ping()
        message = str(err.value)
        assert "\n" not in message and setup.sentinel.address in message, message
        assert "monitors several masters (first, second)" in message and "REDIS_SENTINEL_MASTER" in message
    finally:
        setup.cleanup()


def test_a_name_the_sentinel_at_redis_host_does_not_monitor(console):
    client = connect(_settings(_console_env(console), REDIS_SENTINEL_MASTER="other"))
    with pytest.raises(redis.ConnectionError) as err:
        client.ping()
    message = str(err.value)
    assert "no Redis master 'other'" in message and "does not monitor 'other' (it monitors: mymaster)" in message
    assert "\n" not in message
