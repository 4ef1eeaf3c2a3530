"""The lean `cli` extra: a fresh venv with only `.[cli]` submits a job and fetches its result.

The install is what a laptop user of this checkout does, with the lock as constraints: the
checkout is built into a wheel, and ``pip install --require-hashes -c requirements/lock.txt``
takes that wheel (by the hash it was just built with) with the ``cli`` extra, every other
distribution checked against the lock's hashes. Nothing of the worker (grpcio, numpy, scipy,
scikit-image) may arrive; the job is then submitted and fetched through a real redis-server
and a file:// bucket, with this test playing the worker through the shared protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiosk_protocol as protocol
from harness.redis_server import RedisServer
from harness.wait import wait_for
from kiosk_storage import open_storage

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
HEAVY = ("grpcio", "numpy", "scipy", "scikit-image", "tifffile", "imagecodecs", "tensorflow", "protobuf")


def run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def cli_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding `.[cli]` of this checkout, installed with the lock as constraints."""
    tmp = tmp_path_factory.mktemp("cli-install")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    run([py, "-m", "pip", "install", "-q", "pip==26.3"], env=env)
    dist = tmp / "dist"
    run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(dist), str(ROOT)], env=env)
    (wheel,) = dist.glob("kiosk_operator-*.whl")
    digest = run([py, "-m", "pip", "hash", str(wheel)], env=env).stdout.split()[-1]
    req = tmp / "requirements.txt"
    req.write_text(f"{wheel}[cli] {digest}\n")
    run([py, "-m", "pip", "install", "-q", "--require-hashes", "-c", str(LOCK), "-r", str(req)], env=env)
    return venv


def installed(venv: Path) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
    return json.loads(run([str(venv / "bin" / "python"), "-c", code]).stdout)


def test_cli_extra_brings_no_worker_libraries(cli_venv: Path) -> None:
    dists = installed(cli_venv)
    assert "kiosk-operator" in dists and "rich" in dists and "redis" in dists
    assert not [name for name in HEAVY if name in dists], sorted(dists)
    for name, version in dists.items():  # everything at the lock's version
        if name not in ("kiosk-operator", "pip", "setuptools"):
            assert f"\n{name}=={version}" in "\n" + LOCK.read_text().lower().replace("_", "-"), (name, version)


def test_lean_cli_submits_and_fetches_a_job(cli_venv: Path, redis_server: RedisServer, redis_client,
                                            tmp_path: Path) -> None:
    bucket = f"file://{tmp_path / 'bucket'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "STORAGE_", "KUBECONFIG"))}
    env.update(redis_server.env(), STORAGE_BUCKET=bucket, STORAGE_MAX_RETRY="0", COLUMNS="200",
               KUBECONFIG="/nonexistent/kubeconfig")
    image = tmp_path / "cells.tif"
    image.write_bytes(b"II*\x00 not decoded by the CLI")
    kiosk = str(cli_venv / "bin" / "kiosk")
    out = tmp_path / "out"
    proc = subprocess.Popen([kiosk, "submit", str(image), "--queue", "lean", "--wait", "--out", str(out),
                             "--interval", "0.05", "--timeout", "60"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = protocol.JobStore(redis_client, "lean-test-worker")
        key = wait_for(lambda: store.pop("lean", 0), 30, "the lean CLI's job in Redis")
        job = store.get(key)
        storage = open_storage(bucket)
        assert storage.exists(job["input_file_name"]), "the lean CLI did not upload the input"
        name, url = storage.upload_bytes(b"result-archive", "output/lean.zip")
        store.finish("lean", key, {"status": protocol.DONE, "output_url": url, "output_file_name": name,
                                   "finished_at": protocol.utc_now_iso()})
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr + stdout
    (downloaded,) = out.iterdir()
    assert downloaded.read_bytes() == b"result-archive"

    fetched = tmp_path / "fetched"
    shown = subprocess.run([kiosk, "results", key, "-o", "json", "--out", str(fetched)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == protocol.DONE
    assert [p.read_bytes() for p in fetched.iterdir()] == [b"result-archive"]
