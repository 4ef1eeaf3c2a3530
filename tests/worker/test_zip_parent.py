"""The zip parent's bookkeeping visit by visit: an in-process ZipConsumer against a real
redis-server and file:// storage, with the children finished by hand so that every
intermediate state (progress, children:done/failed, failures) is checked exactly."""

from __future__ import annotations

import zipfile
from pathlib import Path

import redis

import kiosk_protocol as protocol
from kiosk_protocol import zipjobs
from kiosk_protocol.settings import load_settings
from kiosk_storage import open_storage
from kiosk_worker.consumers.zip_parent import LOST_REASON, ZipConsumer

EXPIRE_TIME = 600


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)



def test_parent_progress_is_tracked_visit_by_visit(redis_client: redis.Redis, tmp_path: Path) -> None:

    bucket = tmp_path / "bucket"
    write_zip(bucket / "uploads" / "three.zip", {f"{c}.tif": c.encode() * 10 for c in "abcd"})
    storage = open_storage(f"file://{bucket}")
    store = protocol.JobStore(redis_client, "zip-1", expire_time=EXPIRE_TIME)
    consumer = ZipConsumer(redis_client, storage, "segmentation-zip", settings=load_settings({}),
                           store=store)
    key = protocol.submit_job(redis_client, "segmentation", "uploads/three.zip", "segmentation", "1")

    def visit() -> str | None:
        assert store.pop("segmentation-zip", 0) == key
        return consumer.consume(key, "segmentation-zip")

    assert visit() == "waiting"
    assert redis_client.lrange("segmentation-zip", 0, -1) == [key]  # back in its queue
    assert store.held("segmentation-zip") == []
    children = zipjobs.split_keys(redis_client.hget(key, "children"))
    by_member = {redis_client.hget(c, "original_name"): c for c in children}
    assert sorted(by_member) == ["a.tif", "b.tif", "c.tif", "d.tif"]
    assert sorted(redis_client.lrange("segmentation", 0, -1)) == sorted(children)
    for member, child in by_member.items():
        uploaded = bucket / redis_client.hget(child, "input_file_name")
        assert uploaded.read_bytes() == member[0].encode() * 10

    def finish_child(member: str, status: str, **fields: str) -> None:
        redis_client.hset(by_member[member], mapping={"status": status, **fields})

    out_a = tmp_path / "a_labels.tif"
    out_a.write_bytes(b"labels of a")
    name_a, _ = storage.upload(str(out_a))
    finish_child("a.tif", "done", output_file_name=name_a)
    finish_child("b.tif", "failed", reason="image 'b.tif' is not a valid TIFF image")
    finish_child("c.tif", "predicting")
    assert visit() == "waiting"
    job = redis_client.hgetall(key)
    assert job["status"] == "waiting" and job["progress"] == "50"
    assert job["children:done"] == by_member["a.tif"]
    assert job["children:failed"] == by_member["b.tif"]

    finish_child("c.tif", "done", output_file_name=name_a)
    redis_client.delete(by_member["d.tif"])  # expired before the parent saw it finish
    assert visit() == "done"
    job = redis_client.hgetall(key)
    assert job["progress"] == "100" and job["total_jobs"] == "4"
    failures = zipjobs.decode_failures(job["failures"])
    assert failures == {by_member["b.tif"]: "image 'b.tif' is not a valid TIFF image",
                        by_member["d.tif"]: LOST_REASON}
    done = sorted(zipjobs.split_keys(job["children:done"]))
    assert done == sorted([by_member["a.tif"], by_member["c.tif"]])
    with zipfile.ZipFile(job["output_url"]) as zf:
        assert sorted(zf.namelist()) == [f"a/{Path(name_a).name}", f"c/{Path(name_a).name}"]
    assert store.held("segmentation-zip") == [] and redis_client.llen("segmentation-zip") == 0
    assert 0 < redis_client.ttl(key) <= EXPIRE_TIME
    for child in children:
        if child != by_member["d.tif"]:
            assert 0 < redis_client.ttl(child) <= EXPIRE_TIME


def test_zip_on_a_plain_queue_is_refused(redis_client: redis.Redis, tmp_path: Path) -> None:
    """Children would land on the zip queue itself; refuse with a clear reason."""

    store = protocol.JobStore(redis_client, "zip-2")
    consumer = ZipConsumer(redis_client, open_storage(f"file://{tmp_path}"), "segmentation",
                           settings=load_settings({}), store=store)
    key = protocol.job_key("segmentation", "x.zip")
    redis_client.hset(key, mapping=protocol.submission_fields("x.zip", "segmentation"))
    redis_client.lpush("segmentation", key)
    assert store.pop("segmentation", 0) == key
    assert consumer.consume(key, "segmentation") == "failed"
    assert "segmentation-zip" in redis_client.hget(key, "reason")
    assert ZipConsumer.source_queues(["segmentation", "mesmer-zip"]) == ["segmentation-zip", "mesmer-zip"]
