"""The worker's Redis connection against real servers: TLS (CA, password, client certs) and Sentinel
(discovery, forced failover, master crash), plus the one-line errors of bad settings."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from workerkit import run_batch, save_tiff, spawn_worker, submit, worker_env

import kiosk_protocol as protocol
from harness.ports import free_port
from harness.redis_server import RedisServer, SentinelGroup
from harness.wait import wait_for
from kiosk_model_server.synthetic import make_cells
from kiosk_protocol import JobStore
from kiosk_protocol.redis_config import connect
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
    assert "no Redis master 'mymaster' from REDIS_SENTINEL_HOSTS" in message
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
