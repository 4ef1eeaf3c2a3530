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


def _consumer(redis_client: redis.Redis, bucket: Path, name: str) -> tuple[ZipConsumer, protocol.JobStore]:
    store = protocol.JobStore(redis_client, name, expire_time=EXPIRE_TIME)
    consumer = ZipConsumer(redis_client, open_storage(f"file://{bucket}"), "segmentation-zip",
                           settings=load_settings({}), store=store)
    return consumer, store


def _visit(consumer: ZipConsumer, store: protocol.JobStore, key: str) -> str | None:
    assert store.pop("segmentation-zip", 0) == key
    return consumer.consume(key, "segmentation-zip")


def _victim(redis_client: redis.Redis, bucket: Path) -> str:
    """Somebody else's finished job, whose result must never reach another job's zip."""
    (bucket / "secret").mkdir(parents=True, exist_ok=True)
    (bucket / "secret" / "labels.tif").write_bytes(b"someone else's result")
    key = protocol.job_key("segmentation", "private.tif")
    redis_client.hset(key, mapping={**protocol.submission_fields("uploads/private.tif", "segmentation"),
                                    "status": "done", "output_file_name": "secret/labels.tif"})
    return key


def test_member_name_cannot_inject_another_jobs_key(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A member named ``a,<victim>,z.tif`` would put the victim into the comma-joined
    ``children``: watched, collected into the attacker's zip and expired. It is refused."""
    bucket = tmp_path / "bucket"
    victim = _victim(redis_client, bucket)
    member = f"a,{victim},z.tif"
    write_zip(bucket / "uploads" / "inject.zip", {"ok.tif": b"x", member: b"y"})
    consumer, store = _consumer(redis_client, bucket, "zip-3")
    key = protocol.submit_job(redis_client, "segmentation", "uploads/inject.zip", "segmentation", "1")
    assert _visit(consumer, store, key) == "failed"
    job = redis_client.hgetall(key)
    assert member in job["reason"] and "','" in job["reason"] and "\n" not in job["reason"]
    assert "children" not in job and redis_client.llen("segmentation") == 0
    assert redis_client.ttl(victim) == -1 and redis_client.hget(victim, "status") == "done"


def test_forged_children_list_is_refused(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A ``children`` field the parent did not write (here: set in the submission form) names
    keys that are not its own children: the parent fails, no other job is read or expired."""
    bucket = tmp_path / "bucket"
    victim = _victim(redis_client, bucket)
    write_zip(bucket / "uploads" / "forged.zip", {"ok.tif": b"x"})
    consumer, store = _consumer(redis_client, bucket, "zip-4")
    key = protocol.submit_job(redis_client, "segmentation", "uploads/forged.zip", "segmentation", "1",
                              children=victim, **{"children:done": victim})
    assert _visit(consumer, store, key) == "failed"
    job = redis_client.hgetall(key)
    assert "not its children" in job["reason"] and victim in job["reason"]
    assert "output_url" not in job and zipjobs.decode_failures(job.get("failures")) == {}
    assert redis_client.ttl(victim) == -1 and redis_client.hget(victim, "status") == "done"
    assert not list(bucket.rglob("*_results.zip"))


def test_children_copy_only_submission_fields(redis_client: redis.Redis, tmp_path: Path) -> None:
    """Fan-out copies the Kiosk submission fields, nothing else the parent hash carries."""
    bucket = tmp_path / "bucket"
    write_zip(bucket / "uploads" / "copy.zip", {f"m{i}.tif": b"x" for i in range(3)})
    consumer, store = _consumer(redis_client, bucket, "zip-5")
    key = protocol.submit_job(redis_client, "segmentation", "uploads/copy.zip", "segmentation", "1",
                              label="nuclear")
    redis_client.hset(key, mapping={"notes": "n" * 8000, "x-form-extra": "e" * 8000})  # each under the cap
    assert _visit(consumer, store, key) == "waiting"
    children = zipjobs.split_keys(redis_client.hget(key, "children"))
    assert len(children) == 3
    for child in children:
        assert zipjobs.is_child_of(child, key, "segmentation")
        fields = redis_client.hgetall(child)
        assert set(fields) == set(protocol.SUBMISSION_FIELDS)
        assert fields["label"] == "nuclear" and fields["model_name"] == "segmentation"
        assert redis_client.memory_usage(child) < 4096


def test_oversized_field_fails_the_parent_before_any_work(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A 1 MiB field x 100 members used to grow Redis by over 100 MiB: now the parent fails at
    once with a one-line reason, before it downloads, extracts, uploads or queues anything."""
    bucket = tmp_path / "bucket"
    write_zip(bucket / "uploads" / "big.zip", {f"m{i}.tif": b"x" for i in range(100)})
    consumer, store = _consumer(redis_client, bucket, "zip-6")
    key = protocol.submit_job(redis_client, "segmentation", "uploads/big.zip", "segmentation", "1",
                              label="L" * (1 << 20))
    before = redis_client.info("memory")["used_memory"]
    assert _visit(consumer, store, key) == "failed"
    job = redis_client.hgetall(key)
    assert job["reason"] == f"job field 'label' is {1 << 20} bytes, more than MAX_FIELD_BYTES (8192)"
    assert "children" not in job and "identity_started" not in job
    assert redis_client.llen("segmentation") == 0 and not redis_client.keys("segmentation:*")
    assert redis_client.info("memory")["used_memory"] - before < 1 << 20
    assert sorted(p.name for p in bucket.rglob("*") if p.is_file()) == ["big.zip"]
    assert store.held("segmentation-zip") == [] and 0 < redis_client.ttl(key) <= EXPIRE_TIME


def test_member_with_a_colon_is_a_relative_name(redis_client: redis.Redis, tmp_path: Path) -> None:
    """``x:y.png`` is no drive letter: its child is queued like any other."""
    bucket = tmp_path / "bucket"
    write_zip(bucket / "uploads" / "colon.zip", {"x:y.png": b"png", "dir/C:z.png": b"png2"})
    consumer, store = _consumer(redis_client, bucket, "zip-7")
    key = protocol.submit_job(redis_client, "segmentation", "uploads/colon.zip", "segmentation", "1")
    assert _visit(consumer, store, key) == "waiting", redis_client.hget(key, "reason")
    children = zipjobs.split_keys(redis_client.hget(key, "children"))
    names = sorted(redis_client.hget(c, "original_name") for c in children)
    assert names == ["dir/C:z.png", "x:y.png"]
    for child in children:
        uploaded = bucket / redis_client.hget(child, "input_file_name")
        assert uploaded.read_bytes() in (b"png", b"png2")


def test_parent_written_by_the_previous_release_finishes(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A zip parent fanned out before an upgrade: its ``children`` are comma-joined keys of the
    previous release's form ``{queue}:{member}:{uuid4}`` (zipjobs.child_key before commit
    3e09dbe), which do not name their parent. After the upgrade it still collects them; a key
    of another job slipped in among them (older than the parent) is still refused."""
    import uuid

    bucket = tmp_path / "bucket"
    storage = open_storage(f"file://{bucket}")
    out = tmp_path / "a_labels.tif"
    out.write_bytes(b"labels of a")
    name_a, _ = storage.upload(str(out))

    def legacy_parent(extra: list[str]) -> tuple[str, list[str]]:
        key = protocol.submit_job(redis_client, "segmentation", "uploads/old.zip", "segmentation", "1")
        redis_client.lrem("segmentation-zip", 0, key)
        parent = redis_client.hgetall(key)
        children = [f"segmentation:{m}:{uuid.uuid4()}" for m in ("a.tif", "b.tif", "c.tif")]
        for child, member in zip(children, ("a.tif", "b.tif", "c.tif"), strict=True):
            # The previous release's child_fields: the parent's fields, its own input and name.
            redis_client.hset(child, mapping={**parent, "input_file_name": f"batch/{member}",
                                              "original_name": member, "status": "new",
                                              "identity_upload": "old-zip-worker",
                                              "created_at": protocol.utc_now_iso(),
                                              "updated_at": protocol.utc_now_iso()})
        redis_client.hset(children[0], mapping={"status": "done", "output_file_name": name_a})
        redis_client.hset(children[1], mapping={"status": "failed", "reason": "bad image"})
        redis_client.hset(children[2], mapping={"status": "done", "output_file_name": name_a})
        redis_client.hset(key, mapping={"status": "waiting", "children": ",".join(children + extra),
                                        "children:done": "", "children:failed": "", "progress": "0",
                                        "total_jobs": str(len(children + extra))})
        redis_client.lpush("segmentation-zip", key)
        return key, children

    consumer, store = _consumer(redis_client, bucket, "zip-8")
    key, children = legacy_parent([])
    assert _visit(consumer, store, key) == "done", redis_client.hget(key, "reason")
    job = redis_client.hgetall(key)
    assert sorted(zipjobs.split_keys(job["children:done"])) == sorted([children[0], children[2]])
    assert zipjobs.decode_failures(job["failures"]) == {children[1]: "bad image"}
    with zipfile.ZipFile(job["output_url"]) as zf:
        assert sorted(zf.namelist()) == [f"a/{Path(name_a).name}", f"c/{Path(name_a).name}"]

    victim = f"segmentation:private.tif:{uuid.uuid4()}"  # legacy form, but an older job's
    redis_client.hset(victim, mapping={**protocol.submission_fields("private.tif", "segmentation"),
                                       "original_name": "private.tif", "status": "done",
                                       "created_at": "2020-01-01T00:00:00Z",
                                       "output_file_name": name_a})
    key, _ = legacy_parent([victim])
    assert _visit(consumer, store, key) == "failed"
    assert "not its children" in redis_client.hget(key, "reason")
    assert redis_client.ttl(victim) == -1


def test_legacy_child_keys() -> None:
    parent = {"created_at": "2026-01-02T03:04:05.000Z"}
    key = "segmentation:dir/a.tif:0f8fad5b-d9cb-469f-a165-70867728950e"
    assert zipjobs.legacy_child_member(key, "segmentation") == "dir/a.tif"
    child = {"original_name": "dir/a.tif", "created_at": "2026-01-02T03:04:06+00:00"}
    assert zipjobs.is_legacy_child(key, "segmentation", parent, child)
    assert zipjobs.is_legacy_child(key, "segmentation", parent, {})  # gone: nothing to leak
    assert not zipjobs.is_legacy_child(key, "segmentation", parent,
                                       {**child, "created_at": "2026-01-02T03:04:04Z"})
    assert not zipjobs.is_legacy_child(key, "segmentation", parent, {**child, "original_name": "b.tif"})
    assert not zipjobs.is_legacy_child(key, "mesmer", parent, child)
    assert not zipjobs.is_legacy_child(key, "segmentation", parent, {**child, "created_at": "junk"})
    for bad in ("segmentation:a.tif:0f8fad5bd9cb469fa16570867728950e", "segmentation:a.tif",
                "segmentation::0f8fad5b-d9cb-469f-a165-70867728950e"):
        assert zipjobs.legacy_child_member(bad, "segmentation") is None
