"""The kiosk-worker process: batch mode, SIGTERM drain, SIGKILL, settings errors, heartbeat, plugins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from workerkit import run_batch, save_tiff, settings_for, spawn_worker, submit, worker_env

import kiosk_protocol as protocol
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_model_server.synthetic import make_cells
from kiosk_protocol.keys import dead_letter_key


@pytest.fixture()
def queue() -> str:
    """A queue of this test's own: a worker left over from any other test (the Redis server
    is shared by the whole session) cannot take its jobs, so queue contents are exact."""
    return f"runner-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def slow_server():
    """A model server of our own, so latency changes cannot leak into other tests."""
    server = ModelServer(models=["segmentation"]).start()
    yield server
    server.stop(grace=0)


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"worker did not exit in {timeout}s; stderr:\n{err[-3000:]}") from None
    return proc.returncode, err


def _image_job(client, bucket: Path, name: str = "cells.tif", queue: str = "segmentation") -> str:
    image, _ = make_cells((96, 96), 6, seed=11)
    return submit(client, save_tiff(bucket, name, image), queue=queue)


def _who(client, *keys: str) -> dict[str, dict[str, str]]:
    """Status and last writer of jobs, for assertion messages."""
    return {k: {f: client.hget(k, f) for f in ("status", "identity_started", "updated_by")} for k in keys}


def _status(client, key: str, *wanted: str):
    return lambda: client.hget(key, "status") in wanted


def test_batch_mode_exits_zero_on_an_empty_queue(redis_client, redis_server, model_server, bucket):
    proc = spawn_worker(worker_env(redis_server, model_server, bucket, WORKER_NAME="batch-1"),
                        "--max-jobs", "5")
    code, err = _finish(proc)
    assert code == 0, err
    assert redis_client.zcard(protocol.workers_key("segmentation")) == 0
    assert not redis_client.exists(protocol.worker_info_key("batch-1"))


def test_batch_mode_stops_after_max_jobs(redis_client, redis_server, model_server, bucket, queue):
    keys = [_image_job(redis_client, bucket, f"b{i}.tif", queue) for i in range(3)]
    proc = spawn_worker(worker_env(redis_server, model_server, bucket, EMPTY_QUEUE_TIMEOUT=30,
                                   QUEUE=queue), "--max-jobs", "2")
    code, err = _finish(proc)
    assert code == 0, err
    assert [redis_client.hget(k, "status") for k in keys] == ["done", "done", "new"], _who(redis_client, *keys)
    assert redis_client.lrange(queue, 0, -1) == [keys[2]]


@pytest.mark.parametrize("env, flag, variable", [
    ({"REDIS_PORT": "not-a-port"}, [], "REDIS_PORT"),
    ({"EMPTY_QUEUE_TIMEOUT": "-1"}, [], "EMPTY_QUEUE_TIMEOUT"),
    ({"STORAGE_BUCKET": "ftp://nope"}, [], "STORAGE_BUCKET"),
    ({"CONSUMER_TYPE": "no-such-consumer"}, [], "CONSUMER_TYPE"),
    ({}, ["--max-jobs", "-3"], "--max-jobs"),
])
def test_invalid_setting_exits_2_with_one_line(redis_server, model_server, bucket, env, flag, variable):
    proc = spawn_worker(worker_env(redis_server, model_server, bucket, **env), *flag)
    code, err = _finish(proc)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in err, err


def test_sigterm_while_idle_exits_promptly(redis_client, redis_server, model_server, bucket):
    env = worker_env(redis_server, model_server, bucket, EMPTY_QUEUE_TIMEOUT=60, WORKER_NAME="idle-1")
    proc = spawn_worker(env)
    wait_for(lambda: redis_client.exists(protocol.worker_info_key("idle-1")), 20, "worker registered")
    wait_for(lambda: "cmd=blmove" in redis_client.execute_command("CLIENT", "LIST"), 10, "blocking pop")
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc, timeout=10)  # far less than the 60 s pop timeout
    assert code == 0, err
    assert not redis_client.exists(protocol.worker_info_key("idle-1"))
    assert redis_client.llen(protocol.processing_key("segmentation", "idle-1")) == 0


def test_sigterm_mid_job_finishes_it_within_the_grace_period(redis_client, redis_server, slow_server,
                                                             bucket, queue):
    slow_server.set_latency(1500)
    key = _image_job(redis_client, bucket, queue=queue)
    waiting = _image_job(redis_client, bucket, "next.tif", queue)
    proc = spawn_worker(worker_env(redis_server, slow_server, bucket, GRACE_PERIOD=30,
                                   WORKER_NAME="drain-1", QUEUE=queue))
    wait_for(_status(redis_client, key, "pre-processing", "predicting"), 20, "job started")
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 0, err
    assert redis_client.hget(key, "status") == "done"
    # No new job was taken after SIGTERM.
    assert redis_client.hget(waiting, "status") == "new", _who(redis_client, waiting)
    assert redis_client.lrange(queue, 0, -1) == [waiting]
    assert redis_client.llen(protocol.processing_key(queue, "drain-1")) == 0
    assert redis_client.zcard(protocol.workers_key(queue)) == 0


def test_sigterm_past_the_grace_period_requeues_the_job_in_front(redis_client, redis_server,
                                                                 slow_server, bucket, queue):
    slow_server.set_latency(5000)
    key = _image_job(redis_client, bucket, queue=queue)
    proc = spawn_worker(worker_env(redis_server, slow_server, bucket, GRACE_PERIOD=0.3,
                                   WORKER_NAME="drain-2", QUEUE=queue))
    wait_for(_status(redis_client, key, "pre-processing", "predicting"), 20, "job started")
    later = _image_job(redis_client, bucket, "later.tif", queue)  # queued behind: must not overtake
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc, timeout=15)
    assert code == 0, err
    # Right end is taken next. (This once failed with `later` gone while the test shared the
    # 'segmentation' queue with every other test: a stray worker of another test took it.)
    assert redis_client.lrange(queue, 0, -1) == [later, key], _who(redis_client, later, key)
    assert redis_client.llen(protocol.processing_key(queue, "drain-2")) == 0
    assert redis_client.hget(key, "status") == "new"
    # It really is retried first, and completes.
    slow_server.set_latency(0)
    settings = settings_for(redis_server, slow_server, bucket, QUEUE=queue)
    runner = run_batch(settings, max_jobs=1)
    assert runner.stats.jobs_done == 1 and redis_client.hget(key, "status") == "done"


def test_sigkill_mid_job_leaves_the_item_in_the_processing_list(redis_client, redis_server, slow_server,
                                                                bucket, queue):
    slow_server.set_latency(5000)
    key = _image_job(redis_client, bucket, queue=queue)
    proc = spawn_worker(worker_env(redis_server, slow_server, bucket, WORKER_NAME="victim", QUEUE=queue))
    wait_for(_status(redis_client, key, "predicting"), 20, "job predicting")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    processing = protocol.processing_key(queue, "victim")
    assert redis_client.lrange(processing, 0, -1) == [key]
    assert redis_client.llen(queue) == 0
    # The operator's reclaim puts it back; another worker completes it.
    assert protocol.reclaim_list(redis_client, processing, queue)["requeued"] == 1
    slow_server.set_latency(0)
    run_batch(settings_for(redis_server, slow_server, bucket, WORKER_NAME="rescuer", QUEUE=queue))
    assert redis_client.hget(key, "status") == "done"


def test_restarted_worker_with_the_same_name_gives_back_what_it_held(redis_client, redis_server,
                                                                     model_server, bucket):
    key = _image_job(redis_client, bucket)
    protocol.JobStore(redis_client, "test-worker").pop("segmentation", 0)  # a previous life's item
    run_batch(settings_for(redis_server, model_server, bucket))
    assert redis_client.hget(key, "status") == "done"


def test_heartbeat_reports_current_job_and_service_time(redis_client, redis_server, slow_server, bucket):
    slow_server.set_latency(1200)
    key = _image_job(redis_client, bucket)
    proc = spawn_worker(worker_env(redis_server, slow_server, bucket, WORKER_NAME="beat-1",
                                   EMPTY_QUEUE_TIMEOUT=60))
    info_key = protocol.worker_info_key("beat-1")
    wait_for(lambda: redis_client.hget(info_key, "current") == key, 20, "current job reported")
    assert redis_client.zscore(protocol.workers_key("segmentation"), "beat-1") is not None
    depth = protocol.measure_depth(redis_client, ["segmentation"])
    assert (depth.pending, depth.in_flight) == (0, 1)
    wait_for(lambda: redis_client.hget(info_key, "jobs_done") == "1", 30, "job counted")
    info = redis_client.hgetall(info_key)
    assert info["current"] == "" and float(info["service_time_ewma"]) >= 1.2
    assert info["state"] == "idle"
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc)[0] == 0


def test_several_queues_prefer_the_first(redis_client, redis_server, model_server, bucket):
    image, _ = make_cells((64, 64), 3, seed=12)
    name = save_tiff(bucket, "q.tif", image)
    low = submit(redis_client, name, queue="low")
    high = submit(redis_client, name, queue="high")
    settings = settings_for(redis_server, model_server, bucket, QUEUE="high,low")
    run_batch(settings)
    jobs = [redis_client.hgetall(k) for k in (high, low)]
    assert [j["status"] for j in jobs] == ["done", "done"]
    assert jobs[0]["finished_at"] < jobs[1]["finished_at"]


def test_a_third_party_consumer_registers_through_an_entry_point(redis_client, redis_server,
                                                                  model_server, bucket, tmp_path):
    plugin = tmp_path / "plugin"
    (plugin / "echo_consumer").mkdir(parents=True)
    (plugin / "echo_consumer" / "__init__.py").write_text(textwrap.dedent('''
        from kiosk_worker.consumers.base import Consumer

        class EchoConsumer(Consumer):
            def _consume(self, redis_hash):
                hvals = self.redis.hgetall(redis_hash)
                self.update_key(redis_hash, {"status": "echoing"})
                self.finish_fields["echo"] = hvals["input_file_name"].upper()
                return self.final_status
    '''))
    dist = plugin / "echo_consumer-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-consumer\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kiosk_worker.consumers]\necho = echo_consumer:EchoConsumer\n")
    key = submit(redis_client, "hello.txt", queue="echo")
    env = worker_env(redis_server, model_server, bucket, QUEUE="echo", CONSUMER_TYPE="echo",
                     PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]))
    code, err = _finish(spawn_worker(env, "--max-jobs", "1"))
    assert code == 0, err
    job = redis_client.hgetall(key)
    assert job["status"] == "done" and job["echo"] == "HELLO.TXT" and job["total_time"]


def test_unknown_consumer_names_what_is_available():
    from kiosk_worker.consumers import UnknownConsumer, get_consumer_class

    with pytest.raises(UnknownConsumer, match="unknown consumer type 'bogus'.*segmentation"):
        get_consumer_class("bogus")
    assert get_consumer_class("IMAGE").__name__ == "SegmentationConsumer"


def test_worker_module_runs_with_python_dash_m(redis_server, model_server, bucket):
    env = {**os.environ, **worker_env(redis_server, model_server, bucket)}
    out = subprocess.run([sys.executable, "-m", "kiosk_worker", "--max-jobs", "1"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_reap_workers_ends_a_worker_its_test_left_running(redis_client, redis_server, model_server,
                                                          bucket, queue):
    import workerkit

    proc = spawn_worker(worker_env(redis_server, model_server, bucket, QUEUE=queue,
                                   EMPTY_QUEUE_TIMEOUT=60, WORKER_NAME="stray"))
    wait_for(lambda: redis_client.exists(protocol.worker_info_key("stray")), 20, "worker registered")
    assert workerkit.reap_workers() == [proc.pid]
    assert proc.returncode is not None and not workerkit.SPAWNED


# --- hostile queue items ------------------------------------------------------------------------


def test_a_held_item_that_is_not_a_hash_is_dead_lettered_at_start(redis_client, redis_server, model_server,
                                                                    bucket, queue):
    """A non-hash key in the worker's processing list (WRONGTYPE to every job command) used to
    kill the worker at every start. It goes to the dead-letter list, logged in one escaped,
    shortened line, and the worker goes on with real jobs."""
    bad = f"{queue}:\nFAKE-LOG-LINE injected\x1b[2J:" + "x" * 100_000
    redis_client.set(bad, "not a job")
    redis_client.rpush(protocol.processing_key(queue, "wrongtype-1"), bad)
    good = _image_job(redis_client, bucket, queue=queue)
    proc = spawn_worker(worker_env(redis_server, model_server, bucket, QUEUE=queue, WORKER_NAME="wrongtype-1"),
                        "--max-jobs", "1")
    code, err = _finish(proc)
    assert code == 0, err[-3000:]
    assert redis_client.hget(good, "status") == "done"
    assert redis_client.lrange(dead_letter_key(queue), 0, -1) == [bad]
    assert redis_client.llen(protocol.processing_key(queue, "wrongtype-1")) == 0
    assert redis_client.get(bad) == "not a job"  # kept as it was, for whoever looks into it
    (line,) = [line for line in err.splitlines() if "not a job hash" in line]
    assert "\\nFAKE-LOG-LINE injected\\x1b[2J" in line and len(line) < 600
    assert dead_letter_key(queue) in line
    assert "\x1b" not in err and not any(line.startswith("FAKE-LOG-LINE") for line in err.splitlines())


def test_queue_items_that_are_not_hashes_are_dead_lettered(redis_client, redis_server, model_server,
                                                            bucket, queue):
    """Popped non-hash items (a string, a list) are moved to ``kiosk:dead-letter:{queue}`` with
    one line each; the worker keeps serving the queue and exits cleanly."""
    text_key, list_key = f"{queue}:a.tif:string", f"{queue}:b.tif:list"
    redis_client.set(text_key, "x")
    redis_client.rpush(list_key, "y")
    redis_client.lpush(queue, text_key, list_key)  # taken first, before the real job
    good = _image_job(redis_client, bucket, queue=queue)
    proc = spawn_worker(worker_env(redis_server, model_server, bucket, QUEUE=queue, WORKER_NAME="wrongtype-2"),
                        "--max-jobs", "10")
    code, err = _finish(proc)
    assert code == 0, err[-3000:]
    assert redis_client.hget(good, "status") == "done", _who(redis_client, good)
    assert sorted(redis_client.lrange(dead_letter_key(queue), 0, -1)) == sorted([text_key, list_key])
    assert redis_client.llen(queue) == 0 and redis_client.llen(protocol.processing_key(queue, "wrongtype-2")) == 0
    assert (redis_client.get(text_key), redis_client.lrange(list_key, 0, -1)) == ("x", ["y"])
    assert len([line for line in err.splitlines() if "not a job hash" in line]) == 2
    assert "Traceback" not in err


def test_a_job_with_an_oversized_field_fails_before_any_work(redis_client, redis_server, model_server,
                                                              bucket, queue):
    key = _image_job(redis_client, bucket, queue=queue)
    redis_client.hset(key, "label", "L" * 20_000)
    small = _image_job(redis_client, bucket, "small.tif", queue)
    redis_client.hset(small, "label", "L" * 20_000)
    env = worker_env(redis_server, model_server, bucket, QUEUE=queue, WORKER_NAME="cap-1")
    code, err = _finish(spawn_worker({**env, "MAX_FIELD_BYTES": "32768"}, "--max-jobs", "1"))
    assert code == 0, err[-3000:]
    assert redis_client.hget(key, "status") == "done"  # MAX_FIELD_BYTES is honoured
    code, err = _finish(spawn_worker(env, "--max-jobs", "1"))  # default: 8 KiB
    assert code == 0, err[-3000:]
    job = redis_client.hgetall(small)
    assert job["status"] == "failed", job
    assert job["reason"] == "job field 'label' is 20000 bytes, more than MAX_FIELD_BYTES (8192)"
    assert "identity_started" not in job and "download_time" not in job
