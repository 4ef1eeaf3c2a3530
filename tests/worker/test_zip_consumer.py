"""Zip jobs end to end: real redis-server, real model server over gRPC, file:// storage,
and two real ``kiosk-worker`` processes (a zip worker and a segmentation worker)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile
from workerkit import StatusRecorder

import kiosk_protocol as protocol
from harness.redis_server import RedisServer
from harness.wait import wait_for
from kiosk_model_server.server import ModelServer
from kiosk_model_server.synthetic import make_cells
from kiosk_protocol import zipjobs

N_IMAGES = 4
#: Fields a segmentation worker writes to a child (beyond the submission fields it was given).
WORKER_FIELDS = {"identity_started", "updated_by", "output_url", "output_file_name", "finished_at",
                 "total_time", "download_time", "upload_time", "predict_time", "postprocess_time",
                 "preprocess_time", "total_jobs", "reason", "object_count", "attempts"}
EXPIRE_TIME = 600
MAX_ZIP_MEMBERS = 20
MAX_ZIP_BYTES = 4 << 20


@pytest.fixture(scope="module")
def zip_bucket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bucket for the module's long-lived workers (``bucket`` in conftest is per test)."""
    return tmp_path_factory.mktemp("bucket")


def start_worker(name: str, consumer: str, queue: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {**os.environ, **env, "CONSUMER_TYPE": consumer, "QUEUE": queue, "WORKER_NAME": name}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "kiosk_worker"], env=full,
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def workers(redis_server: RedisServer, model_server: ModelServer, zip_bucket: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    logs = tmp_path_factory.mktemp("logs")
    env = {
        **redis_server.env(),
        "STORAGE_BUCKET": f"file://{zip_bucket}",
        "TF_HOST": "127.0.0.1",
        "TF_PORT": str(model_server.port),
        "EXPIRE_TIME": str(EXPIRE_TIME),
        "EMPTY_QUEUE_TIMEOUT": "1",
        "HEARTBEAT_INTERVAL": "0.5",
        "GRPC_BACKOFF": "0.05",
        "MAX_RETRY": "1",
        "MAX_ZIP_MEMBERS": str(MAX_ZIP_MEMBERS),
        "MAX_ZIP_BYTES": str(MAX_ZIP_BYTES),
        "GRACE_PERIOD": "5",
    }
    procs = {
        "zip": start_worker("zip-worker", "zip", "segmentation-zip", env, logs / "zip.log"),
        "seg": start_worker("seg-worker", "segmentation", "segmentation", env, logs / "seg.log"),
    }
    client = redis_server.client()
    try:
        wait_for(lambda: all(client.hexists(protocol.worker_info_key(n), "heartbeat")
                             for n in ("zip-worker", "seg-worker")) or _dead(procs, logs),
                 timeout=30, message="workers registered")
        assert not _dead(procs, logs)
        yield {name: logs / f"{name}.log" for name in procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        client.close()


def _dead(procs: dict[str, subprocess.Popen], logs: Path) -> str:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise AssertionError(f"{name} worker exited {proc.returncode}: "
                                 f"{(logs / f'{name}.log').read_text()[-2000:]}")
    return ""


@pytest.fixture()
def client(workers: dict[str, Path], redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """A flushed database with both workers running."""
    yield redis_client


@pytest.fixture()
def bucket(zip_bucket: Path) -> Path:
    return zip_bucket


def tiff_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, image)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def submit(client: redis.Redis, bucket: Path, name: str, members: dict[str, bytes]) -> str:
    write_zip(bucket / "uploads" / name, members)
    key = protocol.submit_job(client, "segmentation", f"uploads/{name}",
                              model_name="segmentation", model_version="1")
    assert key.startswith("segmentation-zip:")
    return key


def wait_finished(client: redis.Redis, key: str, timeout: float = 60) -> dict[str, str]:
    wait_for(lambda: client.hget(key, "status") in protocol.FINISHED_STATUSES, timeout=timeout,
             message=f"{key} finished (status {client.hget(key, 'status')!r})")
    return client.hgetall(key)


def matched_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU of each true cell with its best-overlapping predicted cell."""
    ious = []
    for label in np.unique(truth[truth > 0]):
        cell = truth == label
        overlap = pred[cell]
        best = np.bincount(overlap[overlap > 0]).argmax() if (overlap > 0).any() else 0
        pred_cell = pred == best if best else np.zeros_like(cell)
        ious.append((cell & pred_cell).sum() / (cell | pred_cell).sum())
    return float(np.mean(ious))


def test_zip_fans_out_and_collects_every_result(client: redis.Redis, bucket: Path) -> None:
    images = {f"batch/img_{i}.tif": make_cells((64, 64), n_cells=5, seed=i) for i in range(N_IMAGES)}
    members = {name: tiff_bytes(img) for name, (img, _) in images.items()}
    members["__MACOSX/batch/._img_0.tif"] = b"resource fork"
    members["batch/.DS_Store"] = b"finder"
    key = submit(client, bucket, "batch.zip", members)

    # the parent waits (status waiting, children recorded) while children are processed
    wait_for(lambda: client.hget(key, "status") == "waiting", timeout=30, message="parent waiting")
    children = zipjobs.split_keys(client.hget(key, "children"))
    assert len(children) == N_IMAGES
    for child in children:
        queue, member, job_id = child.split(":")
        assert queue == "segmentation" and member in images and len(job_id) >= 32
        assert job_id.startswith(zipjobs.parent_id(key) + ".") and zipjobs.is_child_of(child, key, queue)

    job = wait_finished(client, key)
    assert job["status"] == "done", job.get("reason")
    assert sorted(zipjobs.split_keys(job["children:done"])) == sorted(children)
    assert job["children:failed"] == "" and job["failures"] == ""
    assert job["progress"] == "100" and job["total_jobs"] == str(N_IMAGES)
    assert job["updated_by"] == "zip-worker"

    for child in children:
        fields = client.hgetall(child)
        assert fields["status"] == "done"
        assert fields["model_name"] == "segmentation" and fields["original_name"] in images
        assert fields["input_file_name"] != job["input_file_name"]
        assert "children" not in fields
        copied = set(fields) - WORKER_FIELDS
        assert copied <= set(protocol.SUBMISSION_FIELDS), copied
        assert 0 < client.ttl(child) <= EXPIRE_TIME  # children expire after finishing

    out = Path(job["output_url"])
    assert out.is_file() and out.is_relative_to(bucket)
    assert (bucket / job["output_file_name"]).is_file()
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert len(names) == N_IMAGES
        for name, (_, truth) in images.items():
            stem = name[: -len(".tif")]
            entries = [n for n in names if n.startswith(stem + "/")]
            assert len(entries) == 1, (name, names)
            labels = tifffile.imread(io.BytesIO(zf.read(entries[0])))
            assert labels.shape == truth.shape
            assert matched_iou(labels, truth) >= 0.7


def test_parent_status_order_is_new_waiting_done(client: redis.Redis, bucket: Path) -> None:
    """As in the Kiosk: a zip parent goes new -> waiting -> done, never 'started' on its visits;
    its children go through the single-image order."""
    images = {f"img_{i}.tif": make_cells((32, 32), n_cells=2, seed=i)[0] for i in range(2)}
    with StatusRecorder(client) as recorder:
        key = submit(client, bucket, "order.zip", {n: tiff_bytes(img) for n, img in images.items()})
        job = wait_finished(client, key)
        wait_for(lambda: recorder.statuses(key)[-1:] == ["done"], timeout=10, message="done observed")
    assert job["status"] == "done", job.get("reason")
    assert recorder.statuses(key) == ["new", "waiting", "done"]
    assert "identity_started" not in job
    for child in zipjobs.split_keys(job["children"]):
        assert recorder.statuses(child) == ["new", "started", "pre-processing", "predicting",
                                            "post-processing", "saving-results", "done"]


def test_corrupt_member_fails_only_its_child(client: redis.Redis, bucket: Path) -> None:
    good = {f"ok_{i}.tif": tiff_bytes(make_cells((48, 48), n_cells=3, seed=10 + i)[0]) for i in range(2)}
    members = {**good, "broken.tif": b"II*\x00 this is not really a tiff"}
    key = submit(client, bucket, "mixed.zip", members)
    job = wait_finished(client, key)
    assert job["status"] == "done", job.get("reason")
    failed = zipjobs.split_keys(job["children:failed"])
    assert len(failed) == 1 and failed[0].startswith("segmentation:broken.tif:")
    assert len(zipjobs.split_keys(job["children:done"])) == 2
    failures = zipjobs.decode_failures(job["failures"])
    assert list(failures) == failed
    reason = failures[failed[0]]
    assert reason and "\n" not in reason and "broken.tif" in reason
    assert reason == client.hget(failed[0], "reason")
    with zipfile.ZipFile(job["output_url"]) as zf:
        assert sorted(n.split("/")[0] for n in zf.namelist()) == ["ok_0", "ok_1"]


def _assert_rejected(client: redis.Redis, key: str, *words: str, others: tuple[str, ...] = ()) -> str:
    """The parent failed with a one-line reason naming ``words``; no child exists (``others``:
    job keys of the test's own on the child queue)."""
    job = wait_finished(client, key)
    assert job["status"] == "failed"
    reason = job["reason"]
    assert "\n" not in reason and "Traceback" not in reason and len(reason) < 300
    for word in words:
        assert word in reason, reason
    assert client.llen("segmentation") == 0 and not job.get("children")
    assert sorted(client.keys("segmentation:*")) == sorted(others)
    return reason


def test_zip_bomb_huge_member_fails_parent(client: redis.Redis, bucket: Path) -> None:
    key = submit(client, bucket, "bomb.zip", {"zeros.tif": bytes(MAX_ZIP_BYTES + (1 << 20))})
    assert (bucket / "uploads" / "bomb.zip").stat().st_size < 100_000
    _assert_rejected(client, key, "MAX_ZIP_BYTES")


def test_zip_bomb_lying_header_fails_parent(client: redis.Redis, bucket: Path) -> None:
    path = bucket / "uploads" / "liar.zip"
    write_zip(path, {"a.tif": b"tiny"})
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02")
    data[pos + 24:pos + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # claims ~4 GiB
    path.write_bytes(bytes(data))
    key = protocol.submit_job(client, "segmentation", "uploads/liar.zip", model_name="segmentation")
    _assert_rejected(client, key, "MAX_ZIP_BYTES")


def test_zip_with_too_many_members_fails_parent(client: redis.Redis, bucket: Path) -> None:
    key = submit(client, bucket, "many.zip", {f"m{i}.tif": b"x" for i in range(MAX_ZIP_MEMBERS + 1)})
    _assert_rejected(client, key, "MAX_ZIP_MEMBERS", str(MAX_ZIP_MEMBERS))


def test_path_traversal_entry_fails_parent(client: redis.Redis, bucket: Path) -> None:
    path = bucket / "uploads" / "evil.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fine.tif", tiff_bytes(np.zeros((8, 8), np.float32)))
        zf.writestr(zipfile.ZipInfo("../../escaped.tif"), b"evil")
    key = protocol.submit_job(client, "segmentation", "uploads/evil.zip", model_name="segmentation")
    _assert_rejected(client, key, "outside")
    assert not list(bucket.parent.rglob("escaped.tif"))


def test_worker_keeps_going_after_rejections(client: redis.Redis, bucket: Path) -> None:
    bad = protocol.submit_job(client, "segmentation", "uploads/missing.zip", model_name="segmentation")
    good = submit(client, bucket, "after.zip",
                  {"one.tif": tiff_bytes(make_cells((48, 48), n_cells=3, seed=3)[0])})
    assert wait_finished(client, bad)["status"] == "failed"
    job = wait_finished(client, good)
    assert job["status"] == "done" and job["total_jobs"] == "1"



def test_member_name_injecting_a_job_key_is_refused(client: redis.Redis, bucket: Path) -> None:
    """A member ``a,<victim key>,z.tif`` would add the victim to the comma-joined ``children``:
    its result would land in the attacker's zip and its hash would get an EXPIRE."""
    (bucket / "private").mkdir(parents=True, exist_ok=True)
    (bucket / "private" / "result.zip").write_bytes(b"somebody else's result")
    victim = protocol.job_key("segmentation", "private.tif")
    client.hset(victim, mapping={**protocol.submission_fields("uploads/private.tif", "segmentation"),
                                 "status": "done", "output_file_name": "private/result.zip"})
    member = f"a,{victim},z.tif"
    tiff = tiff_bytes(make_cells((32, 32), n_cells=2, seed=5)[0])
    key = submit(client, bucket, "inject.zip", {"ok.tif": tiff, member: tiff})
    reason = _assert_rejected(client, key, member, "','", others=(victim,))
    assert reason.startswith("zip entry ")
    assert client.ttl(victim) == -1 and client.hget(victim, "status") == "done"


def test_oversized_field_fails_the_parent_before_any_work(client: redis.Redis, bucket: Path) -> None:
    members = {f"m{i}.tif": tiff_bytes(make_cells((32, 32), n_cells=2, seed=i)[0]) for i in range(MAX_ZIP_MEMBERS)}
    write_zip(bucket / "uploads" / "big.zip", members)
    key = protocol.submit_job(client, "segmentation", "uploads/big.zip", model_name="segmentation",
                              model_version="1", label="L" * (1 << 20))
    _assert_rejected(client, key, "'label'", str(1 << 20), "MAX_FIELD_BYTES (8192)")
    assert "identity_started" not in client.hgetall(key)


def test_member_with_a_colon_in_its_name_is_processed(client: redis.Redis, bucket: Path) -> None:
    key = submit(client, bucket, "colon.zip",
                 {"x:y.tif": tiff_bytes(make_cells((48, 48), n_cells=3, seed=21)[0])})
    job = wait_finished(client, key)
    assert job["status"] == "done", job.get("reason")
    assert job["children:failed"] == "" and len(zipjobs.split_keys(job["children:done"])) == 1
    with zipfile.ZipFile(job["output_url"]) as zf:
        assert [n.split("/")[0] for n in zf.namelist()] == ["x:y"]
