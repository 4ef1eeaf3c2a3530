"""Base consumers: the Kiosk's custom-consumer contract, with the bookkeeping done once.

Writing a consumer (the Kiosk's custom-consumer contract, unchanged)::

    from kiosk_worker.consumers.base import TensorFlowServingConsumer

    class MyConsumer(TensorFlowServingConsumer):
        def _consume(self, redis_hash: str) -> str:
            hvals = self.redis.hgetall(redis_hash)           # str -> str
            self.update_key(redis_hash, {"status": "predicting"})
            with self.timed("download_time"):
                path = self.storage.download(hvals["input_file_name"], self.tempdir)
            ...                                              # load, self.grpc_image(...), save
            dest, url = self.storage.upload(zip_path)
            self.finish_fields.update(output_url=url, output_file_name=dest)
            return self.final_status

Register it under the entry-point group ``kiosk_worker.consumers`` (see
``consumers/__init__.py``). What the base class does around ``_consume``:

* ``consume(key, queue)`` skips vanished or already finished hashes, writes
  ``status=started`` + ``identity_started`` (one round trip that also reads
  the hash into ``self.job``; not for classes with ``announce_start = False``,
  such as the zip parent, whose order is new -> waiting -> done), and calls
  ``_consume`` with a fresh per-job temp dir in ``self.tempdir``.
* Returning ``final_status`` ends the job: ``finish_fields`` (plus
  ``finished_at`` and ``total_time`` unless set) are written and the item
  leaves the processing list in one transaction.
* Raising anything ends the job ``failed`` with a one-line ``reason``
  (``errors.reason_for``; raise ``errors.JobError`` for your own messages);
  the traceback goes to the log only. Redis connection errors propagate (``handle``
  reports them as CRASHED) so the runner can reconnect and give the item back.
* Returning any other status (e.g. ``waiting``) keeps the job alive: the status
  is written and the item goes to the back of its queue to be consumed again
  later (how the zip consumer waits for its children without blocking).
* ``handle(WorkItem)`` is ``consume`` for the runner: it returns a typed
  ``work.Outcome`` (done, failed, requeued, skipped, cancelled, crashed) decided
  where the last status is written, and never raises.

``update_key`` stamps ``updated_at``/``updated_by`` and refuses to write once the
runner has cancelled the job (grace period over, item given back).
``set_status`` does the same for progress statuses without waiting for Redis's
reply: the replies are read before the consumer's next write, so statuses still
land in order and before the final one. Every such write goes through
``self.writer`` (``kiosk_worker.jobwrites.JobWriter``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import redis

import kiosk_protocol as protocol
from kiosk_protocol import keys
from kiosk_protocol.settings import Settings
from kiosk_worker.errors import Cancelled, JobError, ModelMismatch, reason_for
from kiosk_worker.jobwrites import JobWriter
from kiosk_worker.metrics import Metrics, queue_wait
from kiosk_worker.work import Outcome, OutcomeKind, WorkItem

__all__ = ["Consumer", "TensorFlowServingConsumer"]


class Consumer:
    """Consumes job keys of one or more queues; subclasses implement ``_consume``.

    ``redis_client`` should decode responses (``str`` values, as upstream),
    ``storage`` has ``download(path, dest_dir) -> local path`` and
    ``upload(local_path, subdir='') -> (dest_name, output_url)``.
    """

    #: Write ``status=started`` (+identity_started) when a visit begins. Consumers whose
    #: jobs are visited several times with their own status order (the zip parent's
    #: ``new -> waiting -> done``) set this to False.
    announce_start: bool = True

    def __init__(
        self,
        redis_client: redis.Redis,
        storage: Any,
        queue: str,
        *,
        settings: Settings | None = None,
        store: protocol.JobStore | None = None,
        name: str | None = None,
        tf_client: Any = None,
        final_status: str = protocol.DONE,
        failed_status: str = protocol.FAILED,
    ) -> None:
        self.redis = redis_client
        self.storage = storage
        self.queue = queue
        self.settings = settings or Settings()
        self.name = name or (store.worker if store else "") or self.settings.worker_name or \
            protocol.default_worker_name()
        self.store = store or protocol.JobStore(
            redis_client, self.name, self.settings.expire_time,
            max_field_bytes=self.settings.max_field_bytes, max_attempts=self.settings.max_attempts)
        self.final_status = final_status
        self.failed_status = failed_status
        self.logger = logging.getLogger(f"kiosk_worker.consumers.{type(self).__name__}")
        self._tf_client = tf_client
        #: Every status this consumer writes to the job it holds goes through here.
        self.writer = JobWriter(self.store, redis_client)
        # Per-job state, reset by consume().
        self.job: dict[str, str] = {}
        self.finish_fields: dict[str, Any] = {}
        self.tempdir = ""
        self._workdir = ""
        self.current_key = ""
        self._prior_status: str | None = None
        #: Where the runner's metrics go (it sets this; records nothing by default).
        self.metrics: Metrics = Metrics()

    # -- the contract ----------------------------------------------------
    def _consume(self, redis_hash: str) -> str:
        """Do the job; return the final status (see module docstring)."""
        raise NotImplementedError

    @staticmethod
    def source_queues(queues: list[str]) -> list[str]:
        """The queues this consumer pops from, given QUEUE (override e.g. to add '-zip')."""
        return list(queues)

    # -- helpers for subclasses --------------------------------------------
    def update_key(self, redis_hash: str, data: Mapping[str, Any]) -> None:
        """HSET fields (stamped with updated_at/updated_by) unless the job was given back."""
        self.writer.update(redis_hash, data)

    def set_status(self, redis_hash: str, status: str, **fields: Any) -> None:
        """Write a progress status without waiting for Redis's reply (read before our next
        write), so a step's status costs no round trip; otherwise as ``update_key``."""
        self.writer.post(redis_hash, status, **fields)

    @contextlib.contextmanager
    def timed(self, field: str) -> Iterator[None]:
        """Add the block's duration in seconds to ``finish_fields[field]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.finish_fields[field] = float(self.finish_fields.get(field, 0.0)) + spent

    @staticmethod
    def get_current_timestamp() -> str:
        return protocol.utc_now_iso()

    def cancel(self) -> None:
        """Called by the runner from another thread: stop writing for the current job."""
        self.writer.cancel()

    @property
    def cancelled(self) -> bool:
        return self.writer.cancelled

    def give_back(self, item: WorkItem) -> bool:
        """The runner's grace period is over: cancel the job's writes and return it to the
        front of its queue (a zip parent stays ``waiting``). False if it was no longer held."""
        return self.writer.give_back(item, reset=self.announce_start)

    # -- the driver ----------------------------------------------------------
    def consume(self, redis_hash: str, queue: str | None = None) -> str | None:
        """Process one job key held in our processing list of ``queue``.

        Returns the status written, or None when the key was skipped (hash gone
        or already finished: the item is just dropped from processing). Cancelled
        and Redis connection errors propagate.
        """
        return self._visit(WorkItem(queue or protocol.queue_of_key(redis_hash), redis_hash)).status

    def handle(self, item: WorkItem) -> Outcome:
        """``consume`` for the runner: what became of the job, also when it did not end
        (CANCELLED, CRASHED with the error); never raises."""
        start = time.perf_counter()
        try:
            return self._visit(item)
        except Cancelled:
            return Outcome(OutcomeKind.CANCELLED, seconds=time.perf_counter() - start)
        except BaseException as err:  # noqa: BLE001 - the runner reports it (or reconnects)
            return Outcome(OutcomeKind.CRASHED, error=err, seconds=time.perf_counter() - start)

    def _visit(self, item: WorkItem) -> Outcome:
        redis_hash = item.key
        self.writer.begin()
        self.finish_fields = {}
        self.current_key = redis_hash
        start = time.perf_counter()
        picked_at = time.time()
        try:
            job, prior = self.writer.start(redis_hash, self.announce_start)
            if job is None:
                self.logger.warning("skipping %s: %s", redis_hash, prior)
                self.writer.skip(item)
                return Outcome(OutcomeKind.SKIPPED, seconds=time.perf_counter() - start)
            self.job = job
            self._prior_status = prior
            if prior == protocol.NEW:  # first pickup, not a revisit or a retry
                waited = queue_wait(job.get("created_at"), picked_at)
                if waited is not None:
                    self.metrics.queue_waited(item.queue, waited)
            self.tempdir = self._job_dir()
            try:
                status = self._consume(redis_hash)
            finally:
                _empty_dir(self.tempdir)
        except (Cancelled, redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as err:  # every other failure ends the job, the worker goes on
            reason = reason_for(err)
            level = logging.WARNING if isinstance(err, JobError) else logging.ERROR
            self.logger.log(level, "job %s failed: %s", redis_hash, reason,
                            exc_info=not isinstance(err, JobError))
            seconds = time.perf_counter() - start
            self.writer.fail(item, self.failed_status, reason, seconds)
            return Outcome(OutcomeKind.FAILED, self.failed_status, err, seconds)
        finally:
            self.current_key = ""
        seconds = time.perf_counter() - start
        if status in (self.final_status, self.failed_status):
            self.writer.finish(item, status, self.finish_fields, seconds)
            kind = OutcomeKind.FAILED if status == self.failed_status else OutcomeKind.DONE
        else:
            self.writer.put_back(item, status)  # drains pending posts first
            kind = OutcomeKind.REQUEUED
        self.logger.info("job %s: %s in %.3fs", redis_hash, status, seconds)
        return Outcome(kind, status, seconds=seconds)

    def _job_dir(self) -> str:
        """One scratch dir per consumer, emptied after every job (saves mkdir/rmdir per job)."""
        if not self._workdir or not os.path.isdir(self._workdir):
            self._workdir = tempfile.mkdtemp(prefix=f"kiosk-{type(self).__name__.lower()}-")
        return self._workdir


def _empty_dir(path: str) -> None:
    """Remove everything inside ``path`` but keep the directory."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


class TensorFlowServingConsumer(Consumer):
    """A consumer that talks to TF Serving: ``grpc_image`` and cached model metadata."""

    def __init__(self, redis_client: redis.Redis, storage: Any, queue: str, **kwargs: Any) -> None:
        super().__init__(redis_client, storage, queue, **kwargs)
        self._metadata_memo: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}

    @property
    def tf_client(self) -> Any:
        """One client (one gRPC channel) per consumer, created on first use."""
        if self._tf_client is None:
            from kiosk_worker.tfs.client import TFServingClient

            s = self.settings
            self._tf_client = TFServingClient(
                s.tf_host, s.tf_port, timeout=s.grpc_timeout, max_retries=s.max_retry,
                backoff=s.grpc_backoff, max_message_bytes=s.grpc_max_message_bytes,
                on_retry=self._model_retry)
        return self._tf_client

    def _model_retry(self, method: str, code: str) -> None:
        self.metrics.model_retry(method, code)

    @staticmethod
    def parse_model_version(value: Any) -> int | None:
        """'' means the latest version; anything else must be a non-negative integer."""
        text = "" if value is None else str(value).strip()
        if not text:
            return None
        try:
            version = int(text)
        except ValueError:
            raise JobError(f"model_version must be a whole number, got '{text}'") from None
        if version < 0:
            raise JobError(f"model_version must not be negative, got '{text}'")
        return version

    def get_model_metadata(self, model_name: str, model_version: Any) -> dict[str, dict[str, Any]]:
        """Serving-default inputs ``{alias: {name, dtype, shape}}``, cached in Redis.

        Cache: hash ``protocol.metadata_key(model_name, model_version)``, field
        ``keys.METADATA_FIELD`` (the Kiosk's JSON form), expiring after
        METADATA_EXPIRE_TIME seconds.
        """
        from kiosk_worker.tfs.client import from_kiosk_cache, to_kiosk_cache

        if not model_name:
            raise JobError("the job names no model (model_name is empty)")
        cache_key = protocol.metadata_key(model_name, model_version)
        ttl = self.settings.metadata_expire_time
        if ttl <= 0:
            meta = self.tf_client.get_model_metadata(model_name, self.parse_model_version(model_version))
            return {k: dict(v) for k, v in meta["inputs"].items()}
        # A process-local copy saves a round trip per job; it lives no longer than Redis's.
        memo = self._metadata_memo.get(cache_key)
        if memo is not None and memo[0] > time.monotonic():
            return {k: dict(v) for k, v in memo[1].items()}
        inputs = None
        cached = self.redis.hget(cache_key, keys.METADATA_FIELD)
        if cached:
            try:
                inputs = from_kiosk_cache(json.loads(cached))
            except (ValueError, AttributeError, TypeError):
                self.logger.warning("ignoring unreadable metadata cache %s", cache_key)
        if inputs is None:
            meta = self.tf_client.get_model_metadata(model_name, self.parse_model_version(model_version))
            inputs = {k: dict(v) for k, v in meta["inputs"].items()}
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(cache_key, keys.METADATA_FIELD, json.dumps(to_kiosk_cache(meta)))
            pipe.expire(cache_key, ttl)
            pipe.execute()
        self._metadata_memo[cache_key] = (time.monotonic() + ttl, inputs)
        return {k: dict(v) for k, v in inputs.items()}

    def input_alias(self, inputs: Mapping[str, Any]) -> str:
        """TF_TENSOR_NAME if the model has it, else the model's only input."""
        name = self.settings.tf_tensor_name
        if name in inputs:
            return name
        if len(inputs) == 1:
            return next(iter(inputs))
        raise ModelMismatch(f"model has inputs {sorted(inputs)} but none named '{name}' (TF_TENSOR_NAME)")

    def grpc_image(self, image: np.ndarray, model_name: str, model_version: Any) -> dict[str, np.ndarray]:
        """Run ``image`` through the model; returns output alias -> array.

        ``image`` is batched (rank of the model input) or one item without the
        batch axis (then the outputs lose it too). Batches are split into
        requests of at most TF_MAX_BATCH_SIZE items and the outputs concatenated.
        """
        inputs = self.get_model_metadata(model_name, model_version)
        alias = self.input_alias(inputs)
        rank = len(inputs[alias]["shape"]) if inputs[alias]["shape"] is not None else image.ndim
        single = image.ndim == rank - 1
        batch = image[np.newaxis] if single else image
        if batch.ndim != rank:
            raise ModelMismatch(
                f"model '{model_name}' expects rank-{rank} input, got shape {list(image.shape)}")
        version = self.parse_model_version(model_version)
        dtype = _np_dtype(inputs[alias]["dtype"])
        step = max(1, self.settings.tf_max_batch_size)
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, batch.shape[0], step):
            chunk = np.ascontiguousarray(batch[start:start + step], dtype=dtype)
            out = self.tf_client.predict(model_name, version, {alias: chunk})
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        result = {k: (v[0] if len(v) == 1 else np.concatenate(v)) for k, v in parts.items()}
        return {k: v[0] for k, v in result.items()} if single else result


def _np_dtype(tf_name: str) -> np.dtype:
    from kiosk_worker.tfs.tensor import dtype_from_name, from_tf_dtype

    try:
        return np.dtype(from_tf_dtype(dtype_from_name(tf_name)))
    except (KeyError, ValueError, TypeError):
        return np.dtype(np.float32)
