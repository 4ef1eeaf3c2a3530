"""The images our Dockerfiles make, built for real with buildah (tests/harness/images.py).

Checked in throwaway buildah containers: the worker runs as 10001 with its entrypoint, imports
its packages but not TensorFlow, and holds exactly the lock's versions; the operator likewise;
the host's CA bundle and pip configuration, mounted into the build, stayed out of the images;
the base stand-in looks like python:3.11-slim-bookworm and matches tools/images/images.lock;
each archive is what ``ctr images import`` takes, under the reference pods use.
"""

from __future__ import annotations

import json
import re
import tarfile
import tomllib
from pathlib import Path

import pytest

from harness import images

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
pytestmark = pytest.mark.timeout(1800)  # a cold build (base, then both images) takes minutes

DISTS = ("import json, importlib.metadata as m; print(json.dumps("
         "{d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")


@pytest.fixture(scope="module")
def built() -> dict[str, images.BuiltImage]:
    return images.ensure_images(["base", "worker", "operator"])


def ok(image: images.BuiltImage, argv: list[str]) -> str:
    result = images.run_in(image, argv)
    assert result.returncode == 0, f"{argv} in {image.ref}: {result.stdout[-1500:]} {result.stderr[-1500:]}"
    return result.stdout


def lock_pins() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", LOCK.read_text()).lower().replace("_", "-")
    return {m.group(1): m.group(2) for m in re.finditer(r"^([a-z0-9.-]+)==(\S+)", text, re.M)}


@pytest.mark.parametrize("name, entry", [("worker", "kiosk-worker"), ("operator", "kiosk-operator")])
def test_image_config_runs_as_10001_with_its_entrypoint(built, name: str, entry: str) -> None:
    image = built[name]
    assert image.ref == f"localhost/kiosk-{name}:dev"
    config = images.inspect(image)["Docker"]["config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == [entry]
    assert any(e.startswith("PATH=/opt/venv/bin:") for e in config["Env"])
    assert ok(image, ["id", "-u"]).strip() == "10001"
    assert "usage:" in ok(image, [entry, "--help"])


def test_worker_imports_its_packages_but_not_tensorflow(built) -> None:
    worker = built["worker"]
    ok(worker, ["python", "-c", "import kiosk_worker.runner, kiosk_model_server, kiosk_storage.gcs, "
                                "kiosk_storage.s3, google.cloud.storage, boto3, skimage, scipy, grpc, PIL"])
    missing = images.run_in(worker, ["python", "-c", "import tensorflow"])
    assert missing.returncode != 0 and "No module named 'tensorflow'" in missing.stderr


def test_operator_has_no_image_processing_libraries(built) -> None:
    operator = built["operator"]
    ok(operator, ["python", "-c", "import kiosk_operator.handlers, kopf, kubernetes"])
    for module in ("numpy", "scipy", "tensorflow", "kiosk_worker.runner"):
        result = images.run_in(operator, ["python", "-c", f"import {module}"])
        assert result.returncode != 0, f"{module} importable in the operator image"


@pytest.mark.parametrize("name", ["worker", "operator"])
def test_image_holds_exactly_the_locked_versions(built, name: str) -> None:
    """pip freeze, read through importlib.metadata: the image's venv has no pip (removed in the build)."""
    dists = json.loads(ok(built[name], ["/opt/venv/bin/python", "-c", DISTS]))
    pins = lock_pins()
    assert "pip" not in dists and "setuptools" not in dists
    off = {n: (v, pins.get(n)) for n, v in dists.items() if n != "kiosk-operator" and pins.get(n) != v}
    assert not off, f"image version != lock: {off}"
    expected = {"worker": {"grpcio", "google-cloud-storage", "boto3", "scikit-image", "pillow", "hiredis"},
                "operator": {"kopf", "kubernetes", "redis"}}[name]
    assert expected <= set(dists)


@pytest.mark.parametrize("name", ["worker", "operator"])
def test_build_mounts_left_nothing_behind(built, name: str) -> None:
    """The host's CA bundle and pip.conf were mounted read-only for pip; the image has the base's."""
    probe = ("import hashlib, os, sys; p = '/etc/ssl/certs/ca-certificates.crt'; "
             "print(hashlib.sha256(open(p, 'rb').read()).hexdigest()); "
             "print(sorted(f for f in ('/etc/pip.conf', '/etc/xdg/pip/pip.conf', '/root/.config/pip/pip.conf') "
             "if os.path.lexists(f)))")
    assert ok(built[name], ["python", "-c", probe]) == ok(built["base"], ["python3", "-c", probe])
    assert "[]" in ok(built[name], ["python", "-c", probe])


def test_base_stands_in_for_python_slim(built) -> None:
    base = built["base"]
    assert base.ref == "docker.io/library/python:3.11.13-slim-bookworm"
    env = dict(e.split("=", 1) for e in images.inspect(base)["Docker"]["config"]["Env"])
    assert env["PATH"].startswith("/usr/local/bin:") and env["LANG"] == "C.UTF-8"
    out = ok(base, ["sh", "-c", "python --version; pip --version; python -m venv /tmp/v && /tmp/v/bin/pip --version;"
                                " ls /usr/lib/python3.11/EXTERNALLY-MANAGED 2>&1 || true"])
    assert re.search(r"^Python 3\.11\.\d+$", out, re.M) and "No such file" in out
    assert out.count("pip ") >= 2


def test_base_matches_the_images_lock(built) -> None:
    lock = tomllib.loads(images.IMAGES_LOCK.read_text())["base"]
    assert lock["reference"] == images.BASE_REF and lock["suite"] == "bookworm"
    assert lock["mirror"] == images.debian_mirror()[0]
    listed = ok(built["base"], ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Package}=${Version}\n"])
    installed = [line.split()[1] for line in listed.splitlines() if line.startswith("installed ")]
    assert dict(line.split("=", 1) for line in installed) == lock["packages"]
    assert lock["packages"]["python3"].startswith("3.11.")


@pytest.mark.parametrize("name", ["worker", "operator"])
def test_archive_is_importable_under_the_pod_reference(built, name: str) -> None:
    image = built[name]
    assert image.archive.parent == images.archives_dir() and image.key in image.archive.name
    with tarfile.open(image.archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == [image.ref]
    # Twice in a row: the shared checkout may have been edited since the fixture built it.
    first, again = images.ensure_image(name), images.ensure_image(name)
    assert again.archive == first.archive and again.key == first.key
    assert not again.built, "unchanged inputs must hit the cache"


def test_cache_key_follows_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    key = images.dockerfile_key("worker", {})
    assert images.dockerfile_key("worker", {}) == key
    assert images.dockerfile_key("worker", {"EXTRAS": "worker,s3"}) != key
    files = images.context_files()
    rel = {p.relative_to(ROOT).as_posix() for p in files}
    assert "requirements/lock.txt" in rel and "pyproject.toml" in rel
    assert not [r for r in rel if "__pycache__" in r or r.endswith(".pyc")]
    assert any(r.startswith("worker/kiosk_worker/") for r in rel)
    monkeypatch.setattr(images, "context_files", lambda: [*files[:-1]])
    assert images.dockerfile_key("worker", {}) != key


def test_images_lock_is_produced_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold base build writes the lock; check mode refuses a base that differs from it."""
    lock = tmp_path / "images.lock"
    monkeypatch.setattr(images, "IMAGES_LOCK", lock)
    text = images.render_lock("http://deb.example/debian", ("12.12", "Sat, 06 Sep 2025"), {"python3": "3.11.2-1+b1"})
    with pytest.raises(images.ImageBuildError):
        images.check_lock(text, check=True)  # no lock yet: nothing to check against
    images.check_lock(text, check=False)
    assert tomllib.loads(lock.read_text())["base"]["packages"] == {"python3": "3.11.2-1+b1"}
    images.check_lock(text, check=True)
    newer = images.render_lock("http://deb.example/debian", ("12.13", "x"), {"python3": "3.11.2-1+b2"})
    with pytest.raises(images.ImageBuildError, match=r"python3 3\.11\.2-1\+b1 -> 3\.11\.2-1\+b2"):
        images.check_lock(newer, check=True)
    assert lock.read_text() == text
    images.check_lock(newer, check=False)
    assert lock.read_text() == newer
