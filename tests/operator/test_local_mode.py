"""Local mode: the real scaling loop drives real kiosk-worker processes against real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import kiosk_protocol as protocol
from harness.local_pool import (
    LocalOperator,
    all_finished,
    processing_lists,
    statuses,
    submit_many,
    tiny_input,
    worker_counts,
    write_pool,
)
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_operator import local


@pytest.fixture(scope="module")
def null_server() -> Iterator[ModelServer]:
    server = ModelServer(models=["null"]).start()
    yield server
    server.stop()


def _registered(client) -> int:
    return client.zcard(protocol.workers_key("segmentation"))


def test_scales_up_with_items_and_back_to_zero(tmp_path: Path, redis_server, redis_client, null_server):
    bucket = tmp_path / "bucket"
    pool = write_pool(tmp_path / "pool.yaml", "lp", redis_server.port, null_server.port, bucket)
    op = LocalOperator(pool, tmp_path / "state").start()
    try:
        # Idle pool: stays at zero workers.
        wait_for(lambda: "workers=0 desired=0" in op.output(), 20, "first progress line")
        assert _registered(redis_client) == 0
        name = tiny_input(bucket)
        keys = submit_many(redis_client, name, 60)
        wait_for(lambda: max(worker_counts(op.output()) or [0]) >= 2, 20, "scale-up to several workers")
        wait_for(lambda: all_finished(redis_client, keys), 60, "all jobs finished")
        assert set(statuses(redis_client, keys)) == {"done"}
        wait_for(
            lambda: worker_counts(op.output())[-1] == 0 and _registered(redis_client) == 0,
            30,
            "scale back to zero after the cooldown",
        )
        assert max(worker_counts(op.output())) <= 3, "never above maxWorkers"
        assert not any(processing_lists(redis_client).values())
    finally:
        assert op.stop() == 0
    assert not list((tmp_path / "state" / "workers").glob("*.pid")), "no worker left behind"


def test_exit_when_idle_after_a_batch(tmp_path: Path, redis_server, redis_client, null_server):
    bucket = tmp_path / "bucket"
    pool = write_pool(
        tmp_path / "pool.yaml",
        "once",
        redis_server.port,
        null_server.port,
        bucket,
        maxWorkers=2,
        itemsPerWorker=10,
        cooldownSeconds=0.5,
    )
    keys = submit_many(redis_client, tiny_input(bucket), 30)
    op = LocalOperator(pool, tmp_path / "state", "--exit-when-idle").start()
    wait_for(op.exited, 60, "local operator exits when idle")
    assert op.proc.returncode == 0, op.output()
    assert set(statuses(redis_client, keys)) == {"done"}
    assert "queues empty and all workers stopped" in op.output()


def test_job_mode_runs_batch_workers(tmp_path: Path, redis_server, redis_client, null_server):
    bucket = tmp_path / "bucket"
    pool = write_pool(
        tmp_path / "pool.yaml",
        "jm",
        redis_server.port,
        null_server.port,
        bucket,
        mode="Job",
        batchSize=10,
        maxWorkers=3,
    )
    keys = submit_many(redis_client, tiny_input(bucket), 45)
    op = LocalOperator(pool, tmp_path / "state", "--exit-when-idle").start()
    wait_for(op.exited, 60, "local operator exits when idle")
    assert op.proc.returncode == 0, op.output()
    assert set(statuses(redis_client, keys)) == {"done"}
    assert max(worker_counts(op.output())) <= 3


def test_bad_pool_file_is_one_line(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: ConsumerPool\nmetadata: {name: x}\nspec:\n  queues: []\n  worker: {image: i}\n")
    assert local.main(["-f", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "spec.queues" in err
    assert local.main(["-f", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_secret_reference_needs_env_in_local_mode(tmp_path: Path):
    pool = write_pool(tmp_path / "p.yaml", "s", 1, 2, tmp_path)
    import yaml

    doc = yaml.safe_load(pool.read_text())
    doc["spec"]["redis"]["passwordSecretRef"] = {"name": "redis", "key": "password"}
    pool.write_text(yaml.safe_dump(doc))
    _, spec, _ = local.load_pool(pool)
    with pytest.raises(local.LocalError, match="REDIS_PASSWORD"):
        local.worker_env(spec, tmp_path, environ={})
    assert local.worker_env(spec, tmp_path, environ={"REDIS_PASSWORD": "pw"})["REDIS_PASSWORD"] == "pw"


def test_tls_secret_files_come_from_env_in_local_mode(tmp_path: Path):
    pool = write_pool(tmp_path / "p.yaml", "s", 1, 2, tmp_path)
    import yaml

    doc = yaml.safe_load(pool.read_text())
    doc["spec"]["redis"].update(tls=True, tlsSecretRef={"name": "redis-tls", "clientCertificate": True})
    pool.write_text(yaml.safe_dump(doc))
    _, spec, _ = local.load_pool(pool)
    with pytest.raises(local.LocalError, match="REDIS_TLS_CA_FILE: spec.redis.tlsSecretRef"):
        local.worker_env(spec, tmp_path, environ={})
    files = {n: tmp_path / f"{n}.pem" for n in ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")}
    for name, path in files.items():
        path.write_bytes(name.encode())
    env = local.worker_env(spec, tmp_path, environ={n: str(p) for n, p in files.items()})
    assert {n: env[n] for n in files} == {n: str(p) for n, p in files.items()}
    tls = local.local_tls(env)
    assert (tls.ca, tls.cert, tls.key) == (b"REDIS_TLS_CA_FILE", b"REDIS_TLS_CERT_FILE", b"REDIS_TLS_KEY_FILE")
    files["REDIS_TLS_KEY_FILE"].unlink()
    with pytest.raises(local.LocalError, match="cannot read"):
        local.local_tls(env)


def test_relative_file_bucket_is_resolved(tmp_path: Path):
    assert local.local_bucket("file://data/b", tmp_path) == f"file://{tmp_path}/data/b"
    assert local.local_bucket("file:///abs/b", tmp_path) == "file:///abs/b"
    assert local.local_bucket("s3://b", tmp_path) == "s3://b"


def test_demo_runs_end_to_end(tmp_path: Path, redis_server, redis_client, monkeypatch, capfd):
    """`make demo`'s Python part: images → jobs → local mode (starting its own model server) → results."""
    import demo  # tools/demo.py

    from harness.ports import free_port

    monkeypatch.chdir(tmp_path)
    pool = write_pool(tmp_path / "pool.yaml", "demo", redis_server.port, free_port(),
                      Path("demo-bucket"), maxWorkers=2, cooldownSeconds=0.5)
    assert demo.main(["-f", str(pool), "--images", "4", "--model-latency-ms", "0"]) == 0
    out = capfd.readouterr().out
    assert "4/4 jobs done" in out and "started kiosk-model-server" in out
    assert len(list((tmp_path / "demo-bucket").glob("*.zip"))) == 4
