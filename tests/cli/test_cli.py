"""The `kiosk` CLI against a real redis-server and file:// storage (and once, a real worker)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile
import yaml
from PIL import Image
from skimage.segmentation import find_boundaries

import kiosk_protocol as protocol
from harness.ports import free_port
from harness.wait import wait_for
from kiosk_cli import follow, inputs, pools
from kiosk_cli import status as status_cmd
from kiosk_cli.errors import CliError
from kiosk_protocol import zipjobs
from kiosk_protocol.registry import heartbeat_ttl
from kiosk_storage import open_storage

BIN = Path(sys.executable).parent
KIOSK = str(BIN / "kiosk")


# --- helpers ----------------------------------------------------------------------------------


def cli_env(redis_server, bucket: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "STORAGE_", "KUBECONFIG"))}
    env.update(redis_server.env())
    env.update(COLUMNS="400", KUBECONFIG="/nonexistent/kubeconfig", STORAGE_MAX_RETRY="0")
    if bucket:
        env["STORAGE_BUCKET"] = bucket
    env.update(extra)
    return env


def kiosk(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KIOSK, *args], env=env, capture_output=True, text=True, timeout=timeout)


def start_kiosk(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    pipe = subprocess.PIPE
    return subprocess.Popen([KIOSK, *args], env=env, stdout=pipe, stderr=pipe, text=True)


def write_tiff(path: Path, seed: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    tifffile.imwrite(path, rng.random((size, size), dtype=np.float32))
    return path


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class FakeWorker:
    """Plays a Kiosk consumer through the shared protocol: pop, walk the statuses, finish."""

    def __init__(self, client: redis.Redis, bucket: str, name: str = "sim-worker") -> None:
        self.store = protocol.JobStore(client, name)
        self.storage = open_storage(bucket)
        self.client = client

    def pop(self, queue: str) -> str:
        return wait_for(lambda: self.store.pop(queue, 0), 20, f"a job in {queue}")

    def succeed(self, queue: str, key: str, payload: bytes = b"result", check_input: bool = True) -> str:
        job = self.store.get(key)
        if check_input:
            assert self.storage.exists(job["input_file_name"]), "input was not uploaded to the bucket"
        steps = (protocol.STARTED, protocol.PRE_PROCESSING, protocol.PREDICTING, protocol.SAVING_RESULTS)
        for status in steps:
            self.store.update(key, {"status": status})
        name, url = self.storage.upload_bytes(payload, f"output/{key.replace(':', '_')}.zip")
        self.store.finish(queue, key, {"status": protocol.DONE, "output_url": url, "output_file_name": name,
                                       "finished_at": protocol.utc_now_iso()})
        return name

    def fail(self, queue: str, key: str, reason: str) -> None:
        self.store.finish(queue, key, {"status": protocol.FAILED, "reason": reason})


@pytest.fixture()
def bucket(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'bucket'}"


# --- pure parts -------------------------------------------------------------------------------


def test_job_fraction_follows_kiosk_statuses() -> None:
    order = [protocol.NEW, protocol.STARTED, protocol.PRE_PROCESSING, protocol.PREDICTING,
             protocol.POST_PROCESSING, protocol.SAVING_RESULTS, protocol.DONE]
    fractions = [follow.job_fraction({"status": s}) for s in order]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert follow.job_fraction({"status": protocol.FAILED}) == 1.0
    assert follow.job_fraction({"status": protocol.WAITING, "progress": "40"}) == pytest.approx(0.4)
    assert 0.0 < follow.job_fraction({"status": "some-new-step"}) < 1.0  # unknown = in progress
    missing = follow.job_progress("q:x:1", {})
    assert missing.finished and missing.status == follow.MISSING and "not found" in missing.fields["reason"]


def test_expand_inputs_walks_dirs_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for rel in ("d/b.tif", "d/a.tif", "d/sub/c.zip", "d/.dot.tif", "d/.hidden/x.tif", "single.png"):
        (tmp_path / rel).write_bytes(b"x")
    got = inputs.expand_inputs([str(tmp_path / p) for p in ("single.png", "d", "d/a.tif")])
    rel = [p.relative_to(tmp_path).as_posix() for p in got]
    assert rel == ["single.png", "d/a.tif", "d/b.tif", "d/sub/c.zip"]
    with pytest.raises(CliError, match="no such file"):
        inputs.expand_inputs([str(tmp_path / "nope.tif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CliError, match="nothing to submit"):
        inputs.expand_inputs([str(tmp_path / "empty")])


def test_pool_row_reads_status_and_tolerates_unreconciled_pools() -> None:
    row = pools.pool_row({
        "metadata": {"name": "gpu", "namespace": "kiosk"},
        "spec": {"queues": ["segmentation", "segmentation-zip"], "scaling": {"mode": "Job"}},
        "status": {"pending": 4, "inFlight": 1, "workers": 2, "desired": 3,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
    queues = "segmentation,segmentation-zip"
    assert row == pools.PoolRow("kiosk/gpu", queues, "Job", "3", "2", "4", "1", "True")
    bare = pools.pool_row({"metadata": {"name": "new", "namespace": "ns"}, "spec": {"queues": ["q"]}})
    assert (bare.desired, bare.workers, bare.ready) == ("-", "-", "-")
    assert pools.pool_queues((row, bare)) == ["segmentation", "segmentation-zip", "q"]


# --- submit -----------------------------------------------------------------------------------


def test_submit_uploads_and_writes_kiosk_job_hashes(redis_server, redis_client, bucket, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_tiff(folder / "a.tif", 1)
    write_tiff(folder / "b.tif", 2)
    write_zip(folder / "batch.zip", {"c.tif": b"not really"})
    result = kiosk("submit", str(folder), "--queue", "segmentation", "--model-name", "NuclearSegmentation",
                   "--model-version", "5", "--field", "scale=1.5", "--field", "label=nuclear",
                   env=cli_env(redis_server, bucket))
    assert result.returncode == 0, result.stderr
    keys = result.stdout.split()
    assert len(keys) == 3
    assert redis_client.llen("segmentation") == 2 and redis_client.llen("segmentation-zip") == 1
    storage = open_storage(bucket)
    by_name = {}
    for key in keys:
        job = redis_client.hgetall(key)
        assert set(protocol.SUBMISSION_FIELDS) <= set(job)
        assert job["status"] == protocol.NEW
        assert job["model_name"] == "NuclearSegmentation" and job["model_version"] == "5"
        assert job["scale"] == "1.5" and job["label"] == "nuclear"
        assert job["created_at"].endswith("Z")
        assert key.startswith(protocol.queue_for_file("segmentation", job["original_name"]) + ":")
        data = Path(storage.download(job["input_file_name"], str(tmp_path / "check"))).read_bytes()
        assert data == (folder / job["original_name"]).read_bytes()
        by_name[job["original_name"]] = key
    assert set(by_name) == {"a.tif", "b.tif", "batch.zip"}
    # FIFO: the consumer takes from the right, so the first file is next.
    assert redis_client.lindex("segmentation", -1) == by_name["a.tif"]


def test_submit_wait_shows_progress_and_downloads_results(redis_server, redis_client, bucket, tmp_path):
    write_tiff(tmp_path / "one.tif", 1)
    write_tiff(tmp_path / "two.tif", 2)
    out = tmp_path / "out"
    proc = start_kiosk("submit", str(tmp_path / "one.tif"), str(tmp_path / "two.tif"), "--queue", "seg",
                       "--wait", "--out", str(out), "--interval", "0.05", "--timeout", "60",
                       env=cli_env(redis_server, bucket))
    try:
        worker = FakeWorker(redis_client, bucket)
        first = worker.pop("seg")
        worker.succeed("seg", first, b"first-result")
        second = worker.pop("seg")
        worker.succeed("seg", second, b"second-result")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr + stdout
    assert "2/2 finished" in stdout and "100%" in stdout
    assert first in stdout and second in stdout
    got = sorted(p.read_bytes() for p in out.iterdir())
    assert got == [b"first-result", b"second-result"]


def test_submit_wait_reports_failed_jobs(redis_server, redis_client, bucket, tmp_path) -> None:
    write_tiff(tmp_path / "bad.tif")
    proc = start_kiosk("submit", str(tmp_path / "bad.tif"), "--queue", "seg", "--wait", "--interval", "0.05",
                       "--out", str(tmp_path / "out"), env=cli_env(redis_server, bucket))
    try:
        worker = FakeWorker(redis_client, bucket)
        worker.fail("seg", worker.pop("seg"), "image has 5 channels, the model takes 1")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr + stdout
    assert "image has 5 channels, the model takes 1" in stdout
    assert "1 of 1 jobs failed" in stdout


def test_submit_wait_timeout_has_its_own_exit_code_and_prints_unfinished_keys(
    redis_server, redis_client, bucket, tmp_path
) -> None:
    write_tiff(tmp_path / "slow.tif")
    write_tiff(tmp_path / "quick.tif")
    proc = start_kiosk("submit", str(tmp_path / "quick.tif"), str(tmp_path / "slow.tif"), "--queue", "few",
                       "--wait", "--timeout", "3", "--interval", "0.05", "--out", str(tmp_path / "out"),
                       env=cli_env(redis_server, bucket))
    try:
        worker = FakeWorker(redis_client, bucket)
        done = worker.pop("few")  # the first file; the second stays queued until the timeout
        worker.succeed("few", done)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    (slow,) = [key for key in redis_client.lrange("few", 0, -1)]
    assert proc.returncode == 4, stderr + stdout
    assert stderr.strip() == "error: timed out after 3s with 1 of 2 jobs unfinished"
    assert stdout.splitlines()[-1] == slow  # the unfinished key, last and alone on its line
    assert done not in stdout.splitlines()


def test_submit_against_a_real_worker(redis_server, redis_client, bucket, tmp_path) -> None:
    """CLI -> Redis -> kiosk-worker -> model server (gRPC) -> file:// bucket -> CLI download."""
    from kiosk_model_server import ModelServer
    from kiosk_model_server.synthetic import make_cells

    image, _ = make_cells((64, 64), n_cells=4, seed=3)
    tifffile.imwrite(tmp_path / "cells.tif", image)
    out = tmp_path / "out"
    server = ModelServer(["segmentation"]).start()
    worker = None
    try:
        env = cli_env(redis_server, bucket)
        worker_env = {**env, "QUEUE": "segmentation", "CONSUMER_TYPE": "segmentation", "TF_HOST": "127.0.0.1",
                      "TF_PORT": str(server.port), "EMPTY_QUEUE_TIMEOUT": "20", "HEARTBEAT_INTERVAL": "0.5",
                      "HOSTNAME": "cli-test-worker"}
        worker = subprocess.Popen([str(BIN / "kiosk-worker"), "--max-jobs", "1"], env=worker_env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        result = kiosk("submit", str(tmp_path / "cells.tif"), "--queue", "segmentation", "--model-name",
                       "segmentation", "--model-version", "1", "--wait", "--out", str(out), "--timeout", "60",
                       env=env, timeout=90)
        worker_log = worker.stderr.read() if worker.poll() is not None else ""
        assert result.returncode == 0, result.stderr + result.stdout + worker_log
        assert worker.wait(30) == 0
        (download,) = list(out.iterdir())
        with zipfile.ZipFile(download) as zf:
            assert zf.namelist(), "the worker's result archive is empty"
        (key,) = redis_client.keys("segmentation:*cells.tif:*")
        assert redis_client.hget(key, "status") == protocol.DONE
        # The preview of a real result: outlines exactly on the worker's label boundaries.
        shown = kiosk("results", key, "--preview", "-o", "json", "--out", str(tmp_path / "preview"), env=env)
        assert shown.returncode == 0, shown.stderr
        (png,) = json.loads(shown.stdout)["previews"]
        with zipfile.ZipFile(download) as zf:
            (member,) = [n for n in zf.namelist() if n.endswith(".tif")]
            labels = np.squeeze(tifffile.imread(io.BytesIO(zf.read(member))))
        assert labels.max() > 0
        pixels = np.asarray(Image.open(png).convert("RGB"))
        assert np.array_equal(np.all(pixels == (255, 255, 0), axis=2), find_boundaries(labels, mode="inner"))
    finally:
        if worker and worker.poll() is None:
            worker.kill()
            worker.wait()
        server.stop(grace=0)


# --- status -----------------------------------------------------------------------------------


def test_status_shows_queues_workers_and_current_items(redis_server, redis_client) -> None:
    for i in range(3):
        protocol.submit_job(redis_client, "segmentation", f"uploads/img{i}.tif")
    protocol.submit_job(redis_client, "tracking", "uploads/movie.trk")
    busy = protocol.JobStore(redis_client, "worker-busy")
    held = busy.pop("segmentation", 0)
    busy.heartbeat(["segmentation"], ttl=2, info={"current": held, "state": "busy", "jobs_done": 7})
    protocol.JobStore(redis_client, "worker-idle").heartbeat(["tracking"], ttl=2, info={"state": "idle"})
    result = kiosk("status", env=cli_env(redis_server, QUEUE="segmentation"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()

    def row(*cells: str) -> str:
        return next(line for line in lines if all(c in line for c in cells))

    assert row("│ segmentation ", " 2 ", " 1 ")  # pending 2, in flight 1
    assert row("│ tracking ", " 1 ", " 0 ")  # discovered from the worker registry
    assert "segmentation-zip" in result.stdout  # the sibling queue is always shown
    assert row("worker-busy", "busy", held, " 7 ")
    assert row("worker-idle", "idle")
    assert "no kubeconfig" in result.stdout  # pools degrade gracefully


def test_status_flags_stale_workers(redis_server, redis_client) -> None:
    store = protocol.JobStore(redis_client, "worker-gone")
    store.heartbeat(["q"], ttl=2)
    redis_client.zadd(protocol.workers_key("q"), {"worker-gone": 1000.0})  # heartbeat long ago
    result = kiosk("status", "--queue", "q", "--no-pools", env=cli_env(redis_server))
    assert result.returncode == 0, result.stderr
    assert "(stale)" in next(line for line in result.stdout.splitlines() if "worker-gone" in line)


def test_status_staleness_is_the_workers_liveness_rule(redis_server, redis_client) -> None:
    """A worker is shown stale exactly when the protocol's heartbeat_ttl says it is overdue."""
    interval = 1.0
    ttl = heartbeat_ttl(interval)
    now = time.time()
    for name, age in [("worker-late", ttl + 2.0), ("worker-recent", ttl - 2.0)]:
        protocol.JobStore(redis_client, name).heartbeat(["q"], ttl=30)
        redis_client.zadd(protocol.workers_key("q"), {name: now - age})
    env = cli_env(redis_server, HEARTBEAT_INTERVAL=str(interval))
    result = kiosk("status", "--queue", "q", "--no-pools", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "(stale)" in next(line for line in lines if "worker-late" in line)
    assert "(stale)" not in next(line for line in lines if "worker-recent" in line)


# --- results ----------------------------------------------------------------------------------


def test_results_shows_fields_and_fetches_output(redis_server, redis_client, bucket, tmp_path) -> None:
    key = protocol.submit_job(redis_client, "seg", "uploads/x.tif", "m", "1")
    worker = FakeWorker(redis_client, bucket)
    worker.pop("seg")
    worker.succeed("seg", key, b"zip-bytes", check_input=False)
    out = tmp_path / "fetched"
    result = kiosk("results", key, "--out", str(out), env=cli_env(redis_server, bucket))
    assert result.returncode == 0, result.stderr
    assert "output_url" in result.stdout and "sim-worker" in result.stdout and "done" in result.stdout
    (fetched,) = list(out.iterdir())
    assert fetched.read_bytes() == b"zip-bytes"


def test_results_of_failed_zip_job_lists_child_failures(redis_server, redis_client) -> None:
    key = protocol.submit_job(redis_client, "seg", "uploads/batch.zip")
    redis_client.hset(key, mapping={"status": "failed", "reason": "2 of 2 images failed",
                                    "failures": "seg%3Aa.tif%3A1=corrupt+image&seg%3Ab.tif%3A2=too+large"})
    result = kiosk("results", key, "--no-download", env=cli_env(redis_server))
    assert result.returncode == 3
    assert "seg:a.tif:1: corrupt image" in result.stdout and "seg:b.tif:2: too large" in result.stdout
    assert "job failed: 2 of 2 images failed" in result.stdout


# --- errors: one line, exit code 1 ------------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["results", "q:x:1"], ["submit", __file__]])
def test_unreachable_redis_is_one_line(args, tmp_path) -> None:
    env = {**os.environ, "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(free_port()), "REDIS_TIMEOUT": "1",
           "STORAGE_BUCKET": f"file://{tmp_path}", "KUBECONFIG": "/nonexistent"}
    result = subprocess.run([KIOSK, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach Redis at 127.0.0.1:")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_unreachable_bucket_is_one_line(redis_server, redis_client, tmp_path) -> None:
    write_tiff(tmp_path / "a.tif")
    env = cli_env(redis_server, f"s3://kiosk-{free_port()}", STORAGE_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                  AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1")
    result = kiosk("submit", str(tmp_path / "a.tif"), env=env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot upload")
    assert "Traceback" not in result.stderr
    assert redis_client.dbsize() == 0  # nothing enqueued without its input


@pytest.mark.parametrize(
    ("args", "extra_env", "message"),
    [
        (["submit", "/no/such/image.tif"], {}, "error: no such file or directory: /no/such/image.tif"),
        (["submit", __file__, "--field", "status=done"], {}, "error: --field status: not a settable"),
        (["submit", __file__, "--field", "oops"], {}, "error: --field expects name=value, got 'oops'"),
        (["status"], {"REDIS_PORT": "http"}, "error: invalid setting REDIS_PORT='http'"),
        (["submit", __file__, "--bucket", "ftp://x"], {}, "error: invalid setting STORAGE_BUCKET='ftp://x'"),
        (["results", "seg:nothing:1"], {}, "error: no job seg:nothing:1 in Redis"),
    ],
)
def test_bad_input_is_one_line(redis_server, redis_client, args, extra_env, message) -> None:
    result = kiosk(*args, env=cli_env(redis_server, **extra_env))
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert redis_client.dbsize() == 0


def test_main_in_process(redis_server, redis_client, bucket, tmp_path, monkeypatch, capsys) -> None:
    from kiosk_cli.__main__ import main

    monkeypatch.setenv("REDIS_HOST", "127.0.0.1")
    monkeypatch.setenv("REDIS_PORT", str(redis_server.port))
    write_tiff(tmp_path / "x.tif")
    assert main(["submit", str(tmp_path / "x.tif"), "--bucket", bucket, "--queue", "inproc"]) == 0
    key = capsys.readouterr().out.strip()
    assert redis_client.lrange("inproc", 0, -1) == [key]
    assert main(["results", key, "--no-download"]) == 0
    assert "not finished yet (status new)" in capsys.readouterr().out


def test_status_lists_the_zip_sibling_of_every_worker_queue(redis_client: redis.Redis) -> None:
    protocol.JobStore(redis_client, "w1").heartbeat(["tracking"], ttl=5)
    queues = status_cmd.discover_queues(redis_client, ["predict"])
    assert queues == ["predict", "predict-zip", "tracking", "tracking-zip"]


# --- hostile job fields: never markup, never terminal escapes ----------------------------------

HOSTILE = "[/red][bold]x[/bold] [link=http://evil.example]click[/link] \x1b]0;owned\x07\x1b[2J\x1b[31m"


def _assert_plain(stdout: str) -> None:
    """Everything from Redis was printed as text: no escape sequence or bell reached the terminal,
    and the markup is shown, not interpreted."""
    assert "\x1b" not in stdout and "\x07" not in stdout
    assert "[/red][bold]x[/bold]" in stdout and "[link=http://evil.example]click[/link]" in stdout
    assert "\\x1b]0;owned\\x07\\x1b[2J" in stdout


def test_results_prints_job_fields_as_plain_text(redis_server, redis_client) -> None:
    key = protocol.submit_job(redis_client, "seg", "uploads/batch.zip")
    child = "seg:" + HOSTILE + ":1"
    redis_client.hset(key, mapping={"status": "failed", "reason": HOSTILE, "label": HOSTILE,
                                    HOSTILE: "a field named by the form",
                                    "failures": zipjobs.encode_failures({child: HOSTILE})})
    result = kiosk("results", key, "--no-download", env=cli_env(redis_server))
    assert result.returncode == 3, result.stderr
    _assert_plain(result.stdout)
    assert "job failed: [/red][bold]x[/bold]" in result.stdout
    assert "failed seg:[/red][bold]x[/bold]" in result.stdout


def test_results_caps_huge_fields(redis_server, redis_client) -> None:
    key = protocol.submit_job(redis_client, "seg", "uploads/x.tif")
    redis_client.hset(key, mapping={"label": "L" * (1 << 20), "status": "waiting"})
    result = kiosk("results", key, "--no-download", env=cli_env(redis_server, COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("L") < 5000 and "..." in result.stdout


def test_status_prints_worker_facts_as_plain_text(redis_server, redis_client) -> None:
    store = protocol.JobStore(redis_client, "worker-x")
    store.heartbeat(["q"], ttl=30, info={"current": HOSTILE, "state": "[/]", "jobs_done": HOSTILE})
    result = kiosk("status", "--queue", "q", "--no-pools", env=cli_env(redis_server))
    assert result.returncode == 0, result.stderr
    _assert_plain(result.stdout)
    assert "│ [/]" in result.stdout


def test_submit_wait_prints_reasons_as_plain_text(redis_server, redis_client, bucket, tmp_path) -> None:
    image = write_tiff(tmp_path / "[bold]bad.tif")  # a local name is no markup either
    proc = start_kiosk("submit", str(image), "--queue", "seg", "--wait", "--interval", "0.05",
                       "--out", str(tmp_path / "out"), env=cli_env(redis_server, bucket))
    try:
        worker = FakeWorker(redis_client, bucket)
        worker.fail("seg", worker.pop("seg"), HOSTILE)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr + stdout
    _assert_plain(stdout)
    assert "[bold]bad.tif" in stdout


def test_errors_quoting_redis_data_are_one_plain_line(redis_server, redis_client, bucket) -> None:
    key = protocol.submit_job(redis_client, "seg", "uploads/x.tif")
    redis_client.hset(key, mapping={"status": "done", "output_file_name": "missing/\x1b[2J\nfake.zip"})
    result = kiosk("results", key, env=cli_env(redis_server, bucket))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot download missing/\\x1b[2J\\nfake.zip")
    assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr


# --- for platform teams: machine output, version, completion, exit codes, aliases -------------


def test_submit_and_status_share_one_default_queue(redis_server, redis_client, bucket, tmp_path) -> None:
    """`kiosk submit` without --queue enqueues where `kiosk status` looks by default (QUEUE)."""
    write_tiff(tmp_path / "a.tif")
    env = cli_env(redis_server, bucket)
    submitted = kiosk("submit", str(tmp_path / "a.tif"), env=env)
    assert submitted.returncode == 0, submitted.stderr
    (key,) = submitted.stdout.split()
    result = kiosk("status", "-o", "json", "--no-pools", env=env)
    assert result.returncode == 0, result.stderr
    queues = {q["name"]: q for q in json.loads(result.stdout)["queues"]}
    queue = key.split(":", 1)[0]
    assert queue == "predict"  # the worker's QUEUE default
    assert queues[queue]["pending"] == 1


def test_status_json_is_whole_and_parseable(redis_server, redis_client) -> None:
    long_name = "worker-" + "x" * 150  # a piped table would crop this at 80 columns
    for i in range(2):
        protocol.submit_job(redis_client, "segmentation", f"uploads/img{i}.tif")
    store = protocol.JobStore(redis_client, long_name)
    held = store.pop("segmentation", 0)
    store.heartbeat(["segmentation"], ttl=30, info={"current": held, "state": "busy", "jobs_done": 4})
    env = cli_env(redis_server, QUEUE="segmentation", COLUMNS="80")
    result = kiosk("status", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"name": "segmentation", "pending": 1, "in_flight": 1, "workers": 1} in data["queues"]
    (worker,) = data["workers"]
    assert worker["name"] == long_name and worker["current"] == held and worker["done"] == "4"
    assert worker["stale"] is False
    assert data["pools"] is None and data["pools_note"] == "no kubeconfig"
    as_yaml = kiosk("status", "-o", "yaml", env=env)
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == {**data, "workers": [{**worker, "age": ANY}]}


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()


def test_results_yaml_and_json(redis_server, redis_client, bucket, tmp_path) -> None:
    key = protocol.submit_job(redis_client, "seg", "uploads/x.tif", "m", "1")
    worker = FakeWorker(redis_client, bucket)
    worker.pop("seg")
    worker.succeed("seg", key, b"zip-bytes", check_input=False)
    out = tmp_path / "fetched"
    result = kiosk("results", key, "-o", "yaml", "--out", str(out), env=cli_env(redis_server, bucket))
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert data["key"] == key and data["status"] == protocol.DONE
    assert data["fields"]["model_name"] == "m" and data["fields"]["status"] == protocol.DONE
    assert Path(data["output"]).read_bytes() == b"zip-bytes" and Path(data["output"]).parent == out
    failed = protocol.submit_job(redis_client, "seg", "uploads/batch.zip")
    redis_client.hset(failed, mapping={"status": "failed", "reason": HOSTILE,
                                       "failures": zipjobs.encode_failures({"seg:a.tif:1": "corrupt"})})
    result = kiosk("results", failed, "--output", "json", env=cli_env(redis_server, bucket))
    assert result.returncode == 3, result.stderr
    assert "\x1b" not in result.stdout
    data = json.loads(result.stdout)
    assert data["failures"] == {"seg:a.tif:1": "corrupt"} and data["fields"]["reason"] == HOSTILE
    assert data["output"] is None


def test_version() -> None:
    result = subprocess.run([KIOSK, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kiosk {metadata.version('kiosk-operator')}"


def test_bash_completion_completes_commands_and_flags(tmp_path) -> None:
    result = subprocess.run([KIOSK, "--print-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    script = tmp_path / "kiosk.bash"
    script.write_text(result.stdout)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        probe = (f'source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; '
                 f'COMP_LINE="{line}"; COMP_POINT={len(line)}; _shtab_kiosk; printf "%s\\n" "${{COMPREPLY[@]}}"')
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("kiosk", "res") == ["results"]
    assert complete("kiosk", "results", "--pre") == ["--preview"]
    assert "--namespace" in complete("kiosk", "status", "--")
    assert {"--job-type", "--model", "--scale"} <= set(complete("kiosk", "submit", "--"))


def _readme_cli_section() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## The `kiosk` CLI")
    return readme[start:readme.index("\n## ", start + 1)]


def test_every_exit_code_is_documented_in_help_and_readme() -> None:
    from kiosk_cli.__main__ import build_parser

    helps = [build_parser().format_help()]
    for command in ("submit", "status", "results"):
        result = subprocess.run([KIOSK, command, "--help"], capture_output=True, text=True, timeout=60)
        helps.append(result.stdout)
    section = _readme_cli_section()
    for code, words in [(0, "success"), (1, "error"), (2, "usage"), (3, "a job failed"), (4, "--timeout"),
                        (130, "interrupted")]:
        for text in helps:
            assert re.search(rf"^\s+{code}\s+.*{re.escape(words)}", text, re.M), (code, text)
        assert re.search(rf"^\| `{code}` \|.*{re.escape(words)}", section, re.M | re.I), code
    usage = subprocess.run([KIOSK, "status", "--bogus"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def test_kiosk_client_flags_are_accepted(redis_server, redis_client, bucket, tmp_path) -> None:
    image = write_tiff(tmp_path / "a.tif")
    result = kiosk("submit", str(image), "-j", "segmentation", "-m", "NuclearSegmentation:5", "-s", "1.5",
                   "-l", "1", "--pre", "normalize", "--post", "deep_watershed", "-b", bucket,
                   env=cli_env(redis_server))
    assert result.returncode == 0, result.stderr
    (key,) = result.stdout.split()
    assert key.startswith("segmentation:") and redis_client.llen("segmentation") == 1
    job = redis_client.hgetall(key)
    assert (job["model_name"], job["model_version"]) == ("NuclearSegmentation", "5")
    assert (job["scale"], job["label"]) == ("1.5", "1")
    assert (job["preprocess_function"], job["postprocess_function"]) == ("normalize", "deep_watershed")
    assert open_storage(bucket).exists(job["input_file_name"])
    long_form = kiosk("submit", str(image), "--job-type", "tracking", "--model", "Tracker", "--scale", "2",
                      "--storage-bucket", bucket, env=cli_env(redis_server))
    assert long_form.returncode == 0, long_form.stderr
    job = redis_client.hgetall(long_form.stdout.strip())
    assert (job["model_name"], job["model_version"], job["scale"]) == ("Tracker", "", "2")
    both = kiosk("submit", str(image), "-m", "A:1", "--model-name", "B", env=cli_env(redis_server, bucket))
    assert both.returncode == 1 and "give one or the other" in both.stderr


# --- preview ----------------------------------------------------------------------------------


def _squares(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for cid, (r0, c0, r1, c1) in boxes.items():
        labels[r0:r1, c0:c1] = cid
    return labels


def _result_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="minisblack")
    return buf.getvalue()


def test_results_preview_draws_label_outlines_on_the_input(redis_server, redis_client, bucket, tmp_path) -> None:
    labels = _squares((64, 64), {1: (8, 8, 24, 24), 2: (30, 36, 50, 60)})
    image = np.where(labels > 0, 1000.0, 100.0).astype(np.float32)  # bright cells on a dim background
    tifffile.imwrite(tmp_path / "cells.tif", image)
    env = cli_env(redis_server, bucket)
    submitted = kiosk("submit", str(tmp_path / "cells.tif"), "--queue", "seg", env=env)
    assert submitted.returncode == 0, submitted.stderr
    worker = FakeWorker(redis_client, bucket)
    key = worker.pop("seg")
    worker.succeed("seg", key, _result_zip({"cells_batch_0_feature_0.tif": _tiff(labels)}))
    out = tmp_path / "out"
    result = kiosk("results", key, "--preview", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("preview saved to ")]
    png = Path(line.removeprefix("preview saved to "))
    assert png.exists() and png.parent == out and png.name == "cells_batch_0_feature_0_preview.png"
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    yellow = np.all(pixels == (255, 255, 0), axis=2)
    # Outlines exactly where a label meets another label or the background, nowhere else.
    assert np.array_equal(yellow, find_boundaries(labels, mode="inner"))
    # The input shows through: cells bright, background dark, grey (no colour) off the outlines.
    inside, outside = pixels[16, 16], pixels[2, 2]
    assert inside[0] == inside[1] == inside[2] and outside[0] == outside[1] == outside[2]
    assert inside[0] > outside[0] + 100


def test_results_preview_colours_tracks_by_lineage(redis_server, redis_client, bucket, tmp_path) -> None:
    # Track 1 divides into 3 and 4 at frame 2; track 2 is unrelated.
    frames = [
        _squares((40, 40), {1: (5, 5, 15, 15), 2: (25, 25, 35, 35)}),
        _squares((40, 40), {1: (5, 5, 15, 15), 2: (25, 25, 35, 35)}),
        _squares((40, 40), {3: (2, 2, 10, 10), 4: (10, 12, 18, 20), 2: (25, 25, 35, 35)}),
    ]
    stack = np.stack(frames)
    lineage = {"1": {"label": 1, "frames": [0, 1], "parent": None, "daughters": [3, 4], "frame_div": 2},
               "2": {"label": 2, "frames": [0, 1, 2], "parent": None, "daughters": [], "frame_div": None},
               "3": {"label": 3, "frames": [2], "parent": 1, "daughters": [], "frame_div": None},
               "4": {"label": 4, "frames": [2], "parent": 1, "daughters": [], "frame_div": None}}
    key = protocol.submit_job(redis_client, "track", "uploads/movie.tif")
    open_storage(bucket).upload_bytes(_tiff(np.full((3, 40, 40), 50, np.uint16)), "uploads/movie.tif")
    worker = FakeWorker(redis_client, bucket)
    worker.pop("track")
    worker.succeed("track", key, _result_zip({"movie_feature_0.tif": _tiff(stack),
                                              "lineage.json": json.dumps(lineage).encode()}), check_input=False)
    out = tmp_path / "out"
    result = kiosk("results", key, "--preview", "-o", "json", "--out", str(out), env=cli_env(redis_server, bucket))
    assert result.returncode == 0, result.stderr
    (png,) = json.loads(result.stdout)["previews"]
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape == (40, 3 * 40 + 2 * 2, 3)  # three frames side by side, 2-pixel gaps

    def colour(frame: int, row: int, col: int) -> tuple[int, ...]:
        return tuple(int(v) for v in pixels[row, frame * 42 + col])

    mother, other = colour(0, 5, 10), colour(0, 25, 30)  # top edges of tracks 1 and 2
    daughter_a, daughter_b = colour(2, 2, 5), colour(2, 10, 15)
    assert mother == daughter_a == daughter_b  # one lineage, one colour
    assert other != mother and len(set(other)) > 1 and len(set(mother)) > 1  # coloured, not grey
    assert colour(1, 25, 30) == other  # a track keeps its colour over time
    assert colour(0, 20, 20)[0] == colour(0, 20, 20)[1]  # off the outlines: the grey input


def test_preview_without_imaging_libraries_is_a_one_line_hint(redis_server, redis_client, bucket, tmp_path):
    key = protocol.submit_job(redis_client, "seg", "uploads/x.tif")
    worker = FakeWorker(redis_client, bucket)
    worker.pop("seg")
    worker.succeed("seg", key, b"zip", check_input=False)
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "skimage.py").write_text("raise ImportError('hidden for this test')\n")
    env = cli_env(redis_server, bucket, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    result = kiosk("results", key, "--preview", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: --preview needs numpy, scikit-image")
    assert "pip install 'kiosk-operator[worker,cli]'" in result.stderr and result.stderr.count("\n") == 1


# --- pools: namespaced, as a user with a Role in one namespace only ---------------------------


@pytest.mark.cluster
def test_status_lists_pools_of_the_context_namespace_as_a_namespaced_user(
    redis_server, redis_client, k8s_cluster, crd, k8s_namespace
) -> None:
    from harness.cluster.api import KubeApi
    from harness.cluster.errors import ApiError

    ns = k8s_namespace
    k8s_cluster.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "viewer", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "pool-viewer", "namespace": ns},
         "rules": [{"apiGroups": ["kiosk.deepcell.org"], "resources": ["consumerpools"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "pool-viewer", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pool-viewer"},
         "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": ns}]},
        {"apiVersion": "kiosk.deepcell.org/v1alpha1", "kind": "ConsumerPool",
         "metadata": {"name": "gpu", "namespace": ns},
         "spec": {"queues": ["pool-queue"], "worker": {"image": "kiosk-worker:1"}}},
    ])
    kubeconfig = k8s_cluster.kubeconfig_for_serviceaccount(ns, "viewer")  # context namespace: ns
    as_viewer = KubeApi(kubeconfig)
    wait_for(lambda: as_viewer.get(f"/apis/kiosk.deepcell.org/v1alpha1/namespaces/{ns}/consumerpools"),
             30, "the Role in effect", ignore=(ApiError,))
    env = cli_env(redis_server, KUBECONFIG=str(kubeconfig))

    table = kiosk("status", "--queue", "pool-queue", env=env)
    assert table.returncode == 0, table.stderr
    assert f"{ns}/gpu" in table.stdout and "not allowed" not in table.stdout, table.stdout

    result = kiosk("status", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["pools"]] == [f"{ns}/gpu"], data["pools_note"]
    assert "pool-queue" in [q["name"] for q in data["queues"]]  # the pools' queues are shown too

    explicit = json.loads(kiosk("status", "-o", "json", "--namespace", ns, "--context", "kiosk-local",
                                env=env).stdout)
    assert [p["name"] for p in explicit["pools"]] == [f"{ns}/gpu"]
    cluster_wide = json.loads(kiosk("status", "-o", "json", "-A", env=env).stdout)
    assert cluster_wide["pools"] is None
    assert cluster_wide["pools_note"] == "not allowed to list ConsumerPools in all namespaces"
    elsewhere = json.loads(kiosk("status", "-o", "json", "-n", "default", env=env).stdout)
    assert elsewhere["pools_note"] == "not allowed to list ConsumerPools in namespace default"
    no_context = json.loads(kiosk("status", "-o", "json", "--context", "nope", env=env).stdout)
    assert no_context["pools"] is None and no_context["pools_note"] == "no kubeconfig context 'nope'"
