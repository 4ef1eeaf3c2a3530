"""Hostile jobs (fields from a public web form), end to end through a real worker.

Real redis-server, the model server over gRPC, a file:// bucket. Each case is a job that
used to cost the worker gigabytes, reach outside its bucket or loop forever; now it fails
with a one-line reason and the next (good) job runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import tifffile
import workerkit
from workerkit import run_batch, save_tiff, settings_for, submit, worker_env

import kiosk_protocol as protocol
from harness.wait import wait_for
from kiosk_model_server.synthetic import make_cells

#: MAX_INPUT_BYTES for the corpus run (the poison TIFF is ~1.2 MB; "too-big" is 3 MB).
INPUT_LIMIT = 2_000_000


def _poison_tiff(path: Path) -> None:
    """129 x 2048 x 2048 uint16, zlib: ~1.2 MB on disk, 1.008 GiB decoded (over the default
    MAX_DECODED_BYTES of 1 GiB), every frame within MAX_IMAGE_HEIGHT x MAX_IMAGE_WIDTH."""
    zeros = np.zeros((2048, 2048), np.uint16)
    tifffile.imwrite(path, (zeros for _ in range(129)), shape=(129, 2048, 2048), dtype=np.uint16,
                     compression="zlib")


def _gray(path: Path, **kwargs: object) -> None:
    image, _ = make_cells((64, 64), 3, seed=3)
    if kwargs:  # codecs such as JPEG 2000 take integer samples
        image = (np.clip(image / max(float(image.max()), 1e-6), 0, 1) * 255).astype(np.uint8)
    tifffile.imwrite(path, image, **kwargs)


HOSTILE = {
    # name: (file made in the bucket or None, input_file_name, job fields, words in the reason)
    "poison-pill-tiff": ("poison.tif", "poison.tif", {}, "MAX_DECODED_BYTES"),
    "channel-commas": ("gray.tif", "gray.tif", {"channels": "0," * 1500}, "MAX_CHANNEL_ENTRIES"),
    "dot-dot": ("gray.tif", "sub/../gray.tif", {}, "'..' segment"),
    "url-outside-bucket": (None, "file:///etc/hostname", {}, "outside"),
    "too-big-input": ("big.tif", "big.tif", {}, "MAX_INPUT_BYTES"),
    "symlink-out-of-bucket": ("link-out.tif", "link-out.tif", {}, "symbolic link"),
    "symlink-inside-bucket": ("link-in.tif", "link-in.tif", {}, "symbolic link"),
    "jpeg2000-tiff": ("j2k.tif", "j2k.tif", {}, "compression JPEG2000"),
    "lerc-tiff": ("lerc.tif", "lerc.tif", {}, "compression LERC"),
}


def _make(bucket: Path, outside: Path, made: str) -> None:
    path = bucket / made
    if path.exists() or path.is_symlink():
        return
    if made == "poison.tif":
        _poison_tiff(path)
    elif made == "gray.tif":
        _gray(path)
    elif made == "big.tif":
        path.write_bytes(b"II*\x00" + os.urandom(3_000_000))
    elif made == "link-out.tif":
        _gray(outside / "secret.tif")
        path.symlink_to(outside / "secret.tif")
    elif made == "link-in.tif":
        _make(bucket, outside, "gray.tif")
        path.symlink_to(bucket / "gray.tif")
    elif made == "j2k.tif":
        _gray(path, compression="jpeg2000")
    elif made == "lerc.tif":
        _gray(path, compression="lerc")


def _one_line(job: dict[str, str]) -> str:
    assert job["status"] == "failed", job
    reason = job["reason"]
    assert reason and "\n" not in reason and "Traceback" not in reason and len(reason) <= 300, reason
    return reason


def test_every_hostile_job_fails_with_a_one_line_reason_and_the_worker_goes_on(
        redis_client, redis_server, model_server, bucket, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    good_image, _ = make_cells((96, 96), 6, seed=8)
    good_name = save_tiff(bucket, "good.tif", good_image)
    bad_keys, good_keys = {}, []
    for case, (made, name, fields, _) in HOSTILE.items():
        if made:
            _make(bucket, outside, made)
        bad_keys[case] = submit(redis_client, name, **fields)
        good_keys.append(submit(redis_client, good_name))  # after every hostile job, a good one
    runner = run_batch(settings_for(redis_server, model_server, bucket, MAX_RETRY=0,
                                    MAX_INPUT_BYTES=INPUT_LIMIT))
    reasons = {case: _one_line(redis_client.hgetall(key)) for case, key in bad_keys.items()}
    for case, reason in reasons.items():
        assert HOSTILE[case][3].lower() in reason.lower(), (case, reason)
    for key in good_keys:
        assert redis_client.hget(key, "status") == "done", redis_client.hgetall(key)
    assert runner.stats.jobs_failed == len(bad_keys)
    assert redis_client.llen(protocol.processing_key("segmentation", "test-worker")) == 0


def test_every_take_is_counted_and_a_job_taken_max_attempts_times_fails(redis_client, redis_server,
                                                                        model_server, bucket):
    """A job whose earlier workers died (its attempts field says so) ends failed at the next
    take, before any work, whichever way it came back (restarted worker or reclaim)."""
    image, _ = make_cells((64, 64), 3, seed=4)
    name = save_tiff(bucket, "ok.tif", image)
    survivor = submit(redis_client, name)
    poison = submit(redis_client, name)
    redis_client.hset(poison, "attempts", "3")  # three workers died holding it
    run_batch(settings_for(redis_server, model_server, bucket))
    assert _one_line(redis_client.hgetall(poison)) == "worker died 3 times on this job"
    assert redis_client.hget(survivor, "status") == "done"
    assert redis_client.hget(survivor, "attempts") == "1"  # a take that ended is one attempt


def test_max_attempts_is_a_setting(redis_client, redis_server, model_server, bucket, monkeypatch):
    image, _ = make_cells((64, 64), 3, seed=5)
    key = submit(redis_client, save_tiff(bucket, "ok.tif", image))
    redis_client.hset(key, "attempts", "3")
    run_batch(settings_for(redis_server, model_server, bucket, MAX_ATTEMPTS=5))
    assert redis_client.hget(key, "status") == "done"
    assert redis_client.hget(key, "attempts") == "4"


# --- a poison pill under a memory limit, in a pool the test restarts like a kubelet -------------

#: What the pods may hold: the test kills a worker whose resident memory passes it, as the
#: kernel's OOM killer does to a container at its cgroup memory limit (SIGKILL, no cleanup).
MEMORY_LIMIT = 256 << 20
#: A hard address-space limit on every worker as well (util-linux ``prlimit --as``; not a
#: preexec_fn, which would fork this process with the model server's gRPC threads running):
#: whatever the watchdog misses cannot take the test machine down with it.
ADDRESS_SPACE_LIMIT = 6 << 30
PRLIMIT = shutil.which("prlimit") or "/usr/bin/prlimit"


def _rss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class LimitedPool:
    """Worker processes under a memory limit, restarted when they die (as a kubelet would)."""

    def __init__(self, env: dict[str, str], names: list[str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.oom_kills: list[str] = []
        self.exits: list[tuple[str, int]] = []  # any other death (none expected)
        for name in names:
            self._start(name)

    def _start(self, name: str) -> None:
        log = open(self.logs / f"{name}-{len(self.oom_kills) + len(self.exits)}.log", "w")  # noqa: SIM115
        command = [PRLIMIT, f"--as={ADDRESS_SPACE_LIMIT}", "--", str(workerkit.WORKER_BIN)]
        proc = subprocess.Popen(command, env={**os.environ, **self.env, "WORKER_NAME": name},
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()
        workerkit.SPAWNED.append(proc)  # reaped at the end of the test whatever happens
        self.procs[name] = proc

    def enforce(self) -> None:
        """One kubelet pass: OOM-kill workers over MEMORY_LIMIT, restart the dead ones."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None and _rss(proc.pid) > MEMORY_LIMIT:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                self.oom_kills.append(name)
                self._start(name)
            elif proc.poll() is not None:
                self.exits.append((name, proc.returncode))
                self._start(name)


def test_a_poison_pill_under_a_memory_limit_fails_after_max_attempts_and_the_pool_drains(
        redis_client, redis_server, model_server, bucket, tmp_path):
    """960 MiB decoded (under MAX_DECODED_BYTES, over the pods' memory): each worker taking it
    is killed, restarted, gives it back to the front of the queue (or a peer takes it); the
    fourth take ends it ``failed`` after MAX_ATTEMPTS (3) deaths, while good jobs keep flowing."""
    zeros = np.zeros((2048, 2048), np.uint16)
    tifffile.imwrite(bucket / "poison.tif", (zeros for _ in range(120)), shape=(120, 2048, 2048),
                     dtype=np.uint16, compression="zlib")
    good_image, _ = make_cells((64, 64), 3, seed=6)
    good = save_tiff(bucket, "good.tif", good_image)
    goods = [submit(redis_client, good) for _ in range(3)]
    poison = submit(redis_client, "poison.tif")
    goods += [submit(redis_client, good) for _ in range(12)]
    env = worker_env(redis_server, model_server, bucket, MALLOC_ARENA_MAX="2", HEARTBEAT_INTERVAL="0.5")
    logs = tmp_path / "logs"
    logs.mkdir()
    pool = LimitedPool(env, ["pod-a", "pod-b"], logs)

    def settled() -> bool:
        pool.enforce()
        return (redis_client.hget(poison, "status") == "failed"
                and all(redis_client.hget(k, "status") == "done" for k in goods))

    wait_for(settled, timeout=240, interval=0.02, message="poison failed and every good job done")
    job = redis_client.hgetall(poison)
    assert job["reason"] == "worker died 3 times on this job", job
    assert job["attempts"] == "3"
    logs_text = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.iterdir()))
    assert pool.exits == [], logs_text
    assert len(pool.oom_kills) == 3, (pool.oom_kills, logs_text)  # one death per attempt, none after
    for name in pool.procs:  # nothing stranded in any processing list
        assert redis_client.llen(protocol.processing_key("segmentation", name)) == 0
