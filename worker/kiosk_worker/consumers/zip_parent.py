"""The zip consumer (CONSUMER_TYPE ``zip``): fan an archive out as child jobs, fan results in.

Parent status order is the Kiosk's: ``new -> waiting -> done``.

* First visit (the parent has no ``children`` yet): download the archive,
  extract it safely (``ziparchive``: member and size limits, no escaping paths, no
  ``,`` in names), upload every member, then in ONE Redis transaction write every
  child hash (the parent's submission fields only; its id in the child's key),
  push the children onto the child queue (the parent queue without ``-zip``)
  and record ``children`` on the parent. Return ``waiting``: the base class
  puts the parent at the back of its queue.
* Later visits: refuse a ``children`` list naming any key that is not one of the
  parent's own children (``zipjobs.foreign_children``), so no other job is watched,
  collected or expired. Then read the open children's statuses, update ``children:done``,
  ``children:failed`` and ``progress``; still waiting -> back of the queue
  again. Nothing blocks: between two visits the worker serves other parents
  (the runner does not re-run a job it just put back sooner than
  ``runner.RECHECK_DELAY``, so an idle worker does not spin).
* All children finished: download each child's result, pack them into one
  zip (``{member path without extension}/...``), upload it, and finish with
  ``output_url``, ``output_file_name``, ``failures`` (urlencoded
  ``{child_key: reason}``) and ``total_jobs``. Children expire EXPIRE_TIME
  after they finish (their own worker sets that) and again from now.
"""

from __future__ import annotations

import os
import uuid

import kiosk_protocol as protocol
from kiosk_protocol import zipjobs
from kiosk_protocol.errors import printable
from kiosk_protocol.fields import (
    CHILDREN,
    CHILDREN_DONE,
    CHILDREN_FAILED,
    FAILURES,
    PROGRESS,
    REASON,
    STATUS,
    TOTAL_JOBS,
)
from kiosk_worker import results, ziparchive
from kiosk_worker.consumers.base import Consumer
from kiosk_worker.errors import Cancelled, JobError, one_line, reason_for

__all__ = ["ZipConsumer"]

LOST_REASON = "job record expired before its result was collected"


class ZipConsumer(Consumer):
    """Consumes ``{queue}-zip`` parents; children are processed by the ``{queue}`` workers."""

    announce_start = False  # the parent goes new -> waiting -> done, never 'started'

    @staticmethod
    def source_queues(queues: list[str]) -> list[str]:
        """Queues a zip worker pops from: ``predict`` -> ``predict-zip`` (upstream's convention)."""
        return [q if q.endswith(protocol.ZIP_SUFFIX) else q + protocol.ZIP_SUFFIX for q in queues]

    @property
    def limits(self) -> ziparchive.ZipLimits:
        return ziparchive.ZipLimits(self.settings.max_zip_members, self.settings.max_zip_bytes)

    def _consume(self, redis_hash: str) -> str:
        job = self.job  # read by the base class in the same round trip as the skip check
        if CHILDREN not in job:
            return self.fan_out(redis_hash, job)
        return self.check_children(redis_hash, job)

    # -- first visit ---------------------------------------------------------------------------

    def fan_out(self, redis_hash: str, job: dict[str, str]) -> str:
        parent_queue = protocol.queue_of_key(redis_hash)
        child_queue = zipjobs.child_queue_of(parent_queue)
        if child_queue == parent_queue:
            raise JobError(f"zip jobs belong on a '{parent_queue}{protocol.ZIP_SUFFIX}' queue, "
                           f"not '{parent_queue}'")
        input_name = job.get("input_file_name", "")
        if not input_name:
            raise JobError("the job names no input file (input_file_name is empty)")
        if not input_name.lower().endswith(".zip"):
            raise JobError(f"input file '{os.path.basename(input_name)}' is not a .zip archive")

        with self.timed("download_time"):
            archive = self.storage.download(input_name, self.tempdir)
        extract_dir = os.path.join(self.tempdir, "members")
        members = ziparchive.extract_archive(archive, extract_dir, self.limits)
        os.remove(archive)

        batch = uuid.uuid4().hex
        children: list[tuple[str, dict[str, str]]] = []
        with self.timed("upload_time"):
            for member in members:
                local = os.path.join(extract_dir, *member.split("/"))
                subdir = "/".join(p for p in (batch, os.path.dirname(member)) if p)
                dest, _ = self.storage.upload(local, subdir=subdir)
                os.remove(local)
                key = zipjobs.child_key(child_queue, member, redis_hash)
                children.append((key, zipjobs.child_fields(job, dest, member, self.name)))

        if self.cancelled:  # given back meanwhile: queue nothing, the next owner starts over
            raise Cancelled(redis_hash)
        # Children and the parent's list of them appear together or not at all.
        parent = self.store.stamp({
            CHILDREN: zipjobs.join_keys(k for k, _ in children),
            CHILDREN_DONE: "",
            CHILDREN_FAILED: "",
            PROGRESS: 0,
            TOTAL_JOBS: len(children),
        })
        # A retried transaction rewrites the children (same fields) but queues them only once.
        pipe = self.redis.pipeline(transaction=True)
        for key, fields in children:
            pipe.hset(key, mapping=fields)
        protocol.push_once(pipe, redis_hash, parent, CHILDREN, child_queue, [k for k, _ in children])
        pipe.execute()
        self.logger.info("zip %s: %d children queued on %s", printable(redis_hash), len(children),
                         printable(child_queue))
        return protocol.WAITING

    # -- later visits --------------------------------------------------------------------------

    def check_children(self, redis_hash: str, job: dict[str, str]) -> str:
        children = zipjobs.split_keys(job.get(CHILDREN))
        child_queue = zipjobs.child_queue_of(protocol.queue_of_key(redis_hash))
        foreign = zipjobs.foreign_children(redis_hash, child_queue, children)
        if foreign:  # keys the previous release wrote are kept if they are this parent's
            pipe = self.redis.pipeline(transaction=False)
            for key in foreign:
                pipe.hmget(key, ("original_name", "created_at"))
            rows = [dict(zip(("original_name", "created_at"), (protocol.text(v) for v in row), strict=True))
                    for row in pipe.execute()]
            foreign = [key for key, row in zip(foreign, rows, strict=True)
                       if not zipjobs.is_legacy_child(key, child_queue, job,
                                                      {k: v for k, v in row.items() if v is not None})]
        if foreign:
            raise JobError(f"the job's children list names {len(foreign)} key(s) that are not its "
                           f"children, e.g. '{printable(foreign[0], 80)}'")
        done = zipjobs.split_keys(job.get(CHILDREN_DONE))
        failed = zipjobs.split_keys(job.get(CHILDREN_FAILED))
        known = set(done) | set(failed)
        open_keys = [k for k in children if k not in known]
        pipe = self.redis.pipeline(transaction=False)
        for key in open_keys:
            pipe.hget(key, STATUS)
        statuses = dict(zip(open_keys, (protocol.text(s) for s in pipe.execute()), strict=True))
        tally = zipjobs.tally_children(children, done, failed, statuses)
        self.update_key(redis_hash, {
            CHILDREN_DONE: zipjobs.join_keys(tally.done),
            CHILDREN_FAILED: zipjobs.join_keys(tally.failed),
            PROGRESS: tally.progress,
        })
        if not tally.complete:
            self.logger.debug("zip %s: %d/%d children finished", printable(redis_hash),
                              tally.total - len(tally.remaining), tally.total)
            return protocol.WAITING
        return self.collect(redis_hash, job, tally)

    # -- last visit ----------------------------------------------------------------------------

    def collect(self, redis_hash: str, job: dict[str, str], tally: zipjobs.ChildTally) -> str:
        fields = (STATUS, "output_file_name", "original_name", REASON)
        pipe = self.redis.pipeline(transaction=False)
        for key in (*tally.done, *tally.failed):
            pipe.hmget(key, fields)
        rows = dict(zip((*tally.done, *tally.failed),
                        ([protocol.text(v) for v in row] for row in pipe.execute()), strict=True))

        failures: dict[str, str] = {}
        for key in tally.failed:
            status, _, _, reason = rows[key]
            failures[key] = reason or (LOST_REASON if status is None else "failed")
        packed: list[tuple[str, str]] = []
        done: list[str] = []
        with self.timed("download_time"):
            for i, key in enumerate(tally.done):
                _, output, member, _ = rows[key]
                member = member or key.split(":", 1)[-1].rsplit(":", 1)[0]
                if not output:
                    failures[key] = LOST_REASON if rows[key][0] is None else "finished without a result file"
                    continue
                try:
                    local = self.storage.download(output, os.path.join(self.tempdir, "results", str(i)))
                except Exception as err:  # one missing result must not sink the whole archive
                    self.logger.warning("zip %s: result of %s unavailable: %s", printable(redis_hash),
                                        printable(key), one_line(err))
                    failures[key] = one_line(f"result file unavailable: {reason_for(err)}")
                    continue
                packed.append((member, local))
                done.append(key)

        stem = results.result_stem(job.get("original_name") or job.get("input_file_name", ""), "archive")
        out_zip = os.path.join(self.tempdir, f"{stem}_results.zip")
        ziparchive.pack_results(packed, out_zip)
        with self.timed("upload_time"):
            dest, url = self.storage.upload(out_zip)

        children = zipjobs.split_keys(job.get(CHILDREN))
        self.expire_children(children)
        self.finish_fields.update({
            "output_url": url,
            "output_file_name": dest,
            FAILURES: zipjobs.encode_failures(failures),
            TOTAL_JOBS: len(children),
            CHILDREN_DONE: zipjobs.join_keys(done),
            CHILDREN_FAILED: zipjobs.join_keys(k for k in children if k in failures),
            PROGRESS: 100,
        })
        self.logger.info("zip %s: %d children done, %d failed", printable(redis_hash), len(done),
                         len(failures))
        return self.final_status

    def expire_children(self, children: list[str]) -> None:
        """Children live EXPIRE_TIME from now (their own finish set it already; this is the floor)."""
        ttl = self.store.expire_time
        if ttl <= 0 or not children:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key in children:
            pipe.expire(key, ttl)
        pipe.execute()
