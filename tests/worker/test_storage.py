"""Storage backends against real servers: moto (S3), fake-gcs-server (GCS), a local directory."""
# The storage-server fixtures are imported from the harness and then named as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from harness.ports import free_port
from harness.storage_servers import (  # noqa: F401 - fixtures
    FakeGcsServer,
    FlakyProxy,
    MotoS3Server,
    gcs_bucket,
    gcs_server,
    s3_bucket,
    s3_server,
)
from kiosk_protocol.settings import load_settings
from kiosk_storage import (
    InputNotFound,
    Storage,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
    get_storage,
    open_storage,
    parse_bucket_url,
)
from kiosk_storage.gcs import GCSStorage
from kiosk_storage.local import LocalStorage
from kiosk_storage.s3 import S3Storage

PAYLOAD = bytes(range(256)) * 1200  # ~300 KB, every byte value

Factory = Callable[..., Storage]


def storage_from_env(env: dict[str, str]) -> Storage:
    """The way the worker builds it: environment → Settings → get_storage."""
    base = {"STORAGE_MAX_RETRY": "2", "STORAGE_BACKOFF": "0.01"}
    return get_storage(load_settings({**base, **env}))


@pytest.fixture(params=["file", "s3", "gs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """A factory for one backend with a fresh bucket (and a key prefix for the clouds)."""
    kind = request.param
    if kind == "file":
        url, extra = f"file://{tmp_path / 'bucket'}", {}
    elif kind == "s3":
        server: MotoS3Server = request.getfixturevalue("s3_server")
        url = f"s3://{request.getfixturevalue('s3_bucket')}/jobs"
        extra = {"STORAGE_ENDPOINT": server.endpoint}
    else:
        request.getfixturevalue("gcs_server")
        url, extra = f"gs://{request.getfixturevalue('gcs_bucket')}/jobs", {}

    def make(**env: str) -> Storage:
        return storage_from_env({"STORAGE_BUCKET": url, **extra, **env})

    return make


@pytest.fixture()
def input_file(tmp_path: Path) -> Path:
    path = tmp_path / "cells image.tif"
    path.write_bytes(PAYLOAD)
    return path


def test_round_trip(backend: Factory, input_file: Path, tmp_path: Path) -> None:
    storage = backend()
    name, url = storage.upload(str(input_file), subdir="output")
    assert name.startswith("output/") and name.endswith("-cells_image.tif")
    assert url
    assert storage.exists(name)

    got = storage.download(name, str(tmp_path / "dl"))
    assert Path(got).read_bytes() == PAYLOAD
    assert Path(got).parent == tmp_path / "dl"

    full_url = storage.url + "/" + name
    assert Path(storage.download(full_url, str(tmp_path / "dl2"))).read_bytes() == PAYLOAD
    assert storage.read_bytes(name) == PAYLOAD

    storage.delete(name)
    assert not storage.exists(name)
    storage.delete(name)  # deleting twice is fine


def test_upload_bytes_keeps_exact_name(backend: Factory) -> None:
    storage = backend()
    name, _ = storage.upload_bytes(b"raw input", "uploads/plate 1.tif")
    assert name == "uploads/plate 1.tif"
    assert storage.read_bytes("uploads/plate 1.tif") == b"raw input"


def test_missing_object_one_line_error(backend: Factory, tmp_path: Path) -> None:
    storage = backend()
    dest = tmp_path / "dest"
    with pytest.raises(InputNotFound) as info:
        storage.download("uploads/x.tif", str(dest))
    assert str(info.value) == f"input file 'uploads/x.tif' not found in {storage.url}"
    assert "\n" not in str(info.value)
    assert isinstance(info.value, StorageError)
    assert list(dest.iterdir()) == []  # no half-written temp file left behind


def test_fifty_concurrent_uploads_get_unique_names(backend: Factory, input_file: Path) -> None:
    storage = backend()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: storage.upload(str(input_file), "out"), range(50)))
    names = [name for name, _ in results]
    assert len(set(names)) == 50
    assert len({url for _, url in results}) == 50
    for name in names[::7]:
        assert storage.read_bytes(name) == PAYLOAD
    assert all(storage.exists(name) for name in names)


def test_seed_style_settings_pick_backend(s3_server: MotoS3Server, s3_bucket: str,
                                          gcs_bucket: str, input_file: Path) -> None:
    aws = storage_from_env({"CLOUD_PROVIDER": "aws", "GCLOUD_STORAGE_BUCKET": s3_bucket,
                            "STORAGE_ENDPOINT": s3_server.endpoint})
    assert isinstance(aws, S3Storage) and aws.url == f"s3://{s3_bucket}"
    name, _ = aws.upload(str(input_file))
    assert aws.read_bytes(name) == PAYLOAD

    gke = storage_from_env({"CLOUD_PROVIDER": "gke", "GCLOUD_STORAGE_BUCKET": gcs_bucket})
    assert isinstance(gke, GCSStorage) and gke.url == f"gs://{gcs_bucket}"
    name, _ = gke.upload(str(input_file))
    assert gke.read_bytes(name) == PAYLOAD

    local = storage_from_env({"STORAGE_BUCKET": f"file://{input_file.parent}/store"})
    assert isinstance(local, LocalStorage)


def test_prefix_applies_to_object_keys(s3_server: MotoS3Server, s3_bucket: str, input_file: Path) -> None:
    storage = storage_from_env({"STORAGE_BUCKET": f"s3://{s3_bucket}/a/b",
                                "STORAGE_ENDPOINT": s3_server.endpoint})
    name, _ = storage.upload(str(input_file), "out")
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"a/b/{name}"]
    # A full URL addresses the bucket root, ignoring the prefix.
    assert storage.read_bytes(f"s3://{s3_bucket}/a/b/{name}") == PAYLOAD


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_missing_bucket_is_named(kind: str, request: pytest.FixtureRequest, input_file: Path) -> None:
    env = {"STORAGE_BUCKET": f"{kind}://no-such-bucket-here"}
    if kind == "s3":
        request.getfixturevalue("s3_bucket")  # test credentials in the environment
        env["STORAGE_ENDPOINT"] = request.getfixturevalue("s3_server").endpoint
    else:
        request.getfixturevalue("gcs_bucket")  # emulator host in the environment
    storage = storage_from_env(env)
    with pytest.raises(StorageError) as info:
        storage.upload(str(input_file))
    assert str(info.value).startswith(f"bucket {kind}://no-such-bucket-here not found (upload ")


def test_s3_presigned_url_fetchable_over_http(s3_server: MotoS3Server, s3_bucket: str,
                                              input_file: Path) -> None:
    storage = storage_from_env({"STORAGE_BUCKET": f"s3://{s3_bucket}", "STORAGE_ENDPOINT": s3_server.endpoint,
                                "SIGNED_URL_EXPIRY": "600"})
    _, url = storage.upload(str(input_file))
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in query
    assert url.startswith(s3_server.endpoint)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == PAYLOAD
        assert resp.headers["Content-Type"] == "image/tiff"


def test_s3_public_url_is_unsigned_and_object_not_made_public(
        s3_server: MotoS3Server, s3_bucket: str, input_file: Path) -> None:
    storage = storage_from_env({"STORAGE_BUCKET": f"s3://{s3_bucket}", "STORAGE_ENDPOINT": s3_server.endpoint,
                                "STORAGE_PUBLIC": "true"})
    name, url = storage.upload(str(input_file))
    assert url == f"{s3_server.endpoint}/{s3_bucket}/{name}"
    grants = s3_server.client().get_object_acl(Bucket=s3_bucket, Key=name)["Grants"]
    assert not [g for g in grants if "AllUsers" in str(g.get("Grantee", {}).get("URI", ""))]
    # No public-read ACL is set by us: anonymous access stays with the bucket's policy.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)
    assert info.value.code == 403


def test_gcs_unsigned_fallback_url_works_against_emulator(
        gcs_server: FakeGcsServer, gcs_bucket: str, input_file: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    storage = storage_from_env({"STORAGE_BUCKET": f"gs://{gcs_bucket}"})
    with caplog.at_level(logging.WARNING, logger="kiosk_storage.gcs"):
        name, url = storage.upload(str(input_file), "out")
        storage.upload(str(input_file), "out")
    assert url.startswith(f"{gcs_server.endpoint}/download/storage/v1/b/{gcs_bucket}/o/")
    assert url.endswith("?alt=media")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == PAYLOAD
    warnings = [r for r in caplog.records if "cannot sign" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per upload


def test_gcs_public_url(gcs_server: FakeGcsServer, gcs_bucket: str, input_file: Path) -> None:
    storage = storage_from_env({"STORAGE_BUCKET": f"gs://{gcs_bucket}", "STORAGE_PUBLIC": "true"})
    name, url = storage.upload(str(input_file))
    assert url == f"{gcs_server.endpoint}/{gcs_bucket}/{name}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == PAYLOAD


def test_gcs_signed_url_with_service_account_key(gcs_server: FakeGcsServer, gcs_bucket: str) -> None:
    """Credentials with a private key produce a V4 signed URL (signing is local, no server call)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.cloud import storage as gcs
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    creds = service_account.Credentials.from_service_account_info({
        "type": "service_account", "client_email": "worker@test.iam.gserviceaccount.com",
        "private_key": pem, "private_key_id": "1", "token_uri": "http://127.0.0.1:1/token",
        "project_id": "test",
    })
    client = gcs.Client(project="test", credentials=creds,
                        client_options={"api_endpoint": gcs_server.endpoint})
    storage = GCSStorage(parse_bucket_url(f"gs://{gcs_bucket}"), client=client, url_expiry=900)
    query = parse_qs(urlsplit(storage.url_for("out/x.zip")).query)
    assert query["X-Goog-Expires"] == ["900"]
    assert query["X-Goog-Credential"][0].startswith("worker@test.iam.gserviceaccount.com/")
    assert "X-Goog-Signature" in query


def test_local_url_is_plain_path_and_escapes_rejected(tmp_path: Path, input_file: Path) -> None:
    root = tmp_path / "store"
    storage = storage_from_env({"STORAGE_BUCKET": f"file://{root}"})
    name, url = storage.upload(str(input_file), "out")
    assert url == str(root / name)
    assert Path(url).read_bytes() == PAYLOAD
    assert storage.read_bytes(f"file://{root}/{name}") == PAYLOAD
    for bad in ("../secret.tif", "/etc/passwd", "file:///etc/passwd"):
        with pytest.raises(StorageError, match="outside"):
            storage.download(bad, str(tmp_path / "dl"))
    with pytest.raises(StorageError, match="outside"):
        storage.upload_bytes(b"x", "../../escape.txt")


@pytest.mark.parametrize("url", ["ftp://x", "gs://", "file://relative/dir", "bucket-only", "s3:/x"])
def test_bad_bucket_urls_are_one_line_errors(url: str) -> None:
    with pytest.raises(StorageConfigError) as info:
        open_storage(url)
    assert "\n" not in str(info.value) and repr(url) in str(info.value)


def test_scheme_mismatch_is_rejected(backend: Factory, tmp_path: Path) -> None:
    storage = backend()
    other = "gs://elsewhere/x.tif" if not storage.url.startswith("gs://") else "s3://elsewhere/x.tif"
    with pytest.raises(StorageError, match="scheme"):
        storage.download(other, str(tmp_path))


# ---- faults: real 5xx through a proxy, real connection refused -----------------------


@pytest.fixture()
def s3_proxy(s3_server: MotoS3Server) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(s3_server.port).start()
    yield proxy
    proxy.stop()


@pytest.fixture()
def gcs_proxy(gcs_server: FakeGcsServer) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(gcs_server.port).start()
    yield proxy
    proxy.stop()


def _through_proxy(kind: str, proxy: FlakyProxy, bucket: str, retries: int = 3) -> Storage:
    return storage_from_env({"STORAGE_BUCKET": f"{kind}://{bucket}", "STORAGE_ENDPOINT": proxy.endpoint,
                             "STORAGE_MAX_RETRY": str(retries)})


@pytest.fixture(params=["s3", "gs"])
def flaky(request: pytest.FixtureRequest) -> tuple[str, FlakyProxy, str]:
    kind = request.param
    if kind == "s3":
        return kind, request.getfixturevalue("s3_proxy"), request.getfixturevalue("s3_bucket")
    return kind, request.getfixturevalue("gcs_proxy"), request.getfixturevalue("gcs_bucket")


def test_5xx_is_retried_then_succeeds(flaky: tuple[str, FlakyProxy, str], input_file: Path,
                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kind, proxy, bucket = flaky
    storage = _through_proxy(kind, proxy, bucket)

    proxy.fail_next(2, 503)
    before = proxy.requests
    with caplog.at_level(logging.WARNING, logger="kiosk_storage.base"):
        name, _ = storage.upload(str(input_file), "out")
    assert proxy.requests - before == 3  # two 503s, then the forwarded upload
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2

    proxy.fail_next(2, 500)
    before = proxy.requests
    path = storage.download(name, str(tmp_path / "dl"))
    assert Path(path).read_bytes() == PAYLOAD
    assert proxy.requests - before == 3


def test_exhausted_5xx_retries_end_in_one_line_error(flaky: tuple[str, FlakyProxy, str],
                                                     tmp_path: Path) -> None:
    kind, proxy, bucket = flaky
    storage = _through_proxy(kind, proxy, bucket, retries=2)
    storage.upload_bytes(b"data", "in.tif")
    proxy.fail_next(100, 503)
    before = proxy.requests
    with pytest.raises(StorageUnavailable) as info:
        storage.download("in.tif", str(tmp_path))
    assert proxy.requests - before == 3  # 1 try + STORAGE_MAX_RETRY=2 retries, then stop
    message = str(info.value)
    assert message.startswith(f"storage {kind}://{bucket} unavailable after 3 attempts (download 'in.tif')")
    assert "\n" not in message


@pytest.mark.parametrize("status", [400, 403])
def test_4xx_is_not_retried(flaky: tuple[str, FlakyProxy, str], tmp_path: Path, status: int) -> None:
    kind, proxy, bucket = flaky
    storage = _through_proxy(kind, proxy, bucket)
    storage.upload_bytes(b"data", "in.tif")
    proxy.fail_next(100, status)
    before = proxy.requests
    with pytest.raises(StorageError) as info:
        storage.download("in.tif", str(tmp_path))
    assert not isinstance(info.value, StorageUnavailable)
    assert proxy.requests - before == 1
    assert f"{kind}://{bucket}" in str(info.value) and "\n" not in str(info.value)
    if status == 403:
        assert str(info.value).startswith(f"access denied to {kind}://{bucket}")


def test_s3_connection_refused_is_retried_then_fails(s3_bucket: str, tmp_path: Path,
                                                     input_file: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    server = MotoS3Server().start()
    try:
        server.create_bucket(s3_bucket)
        storage = storage_from_env({"STORAGE_BUCKET": f"s3://{s3_bucket}",
                                    "STORAGE_ENDPOINT": server.endpoint})
        name, _ = storage.upload(str(input_file))
        server.stop()  # the server goes away: connections are refused
        with caplog.at_level(logging.WARNING, logger="kiosk_storage.base"), \
                pytest.raises(StorageUnavailable) as info:
            storage.download(name, str(tmp_path))
        assert str(info.value).startswith(f"storage s3://{s3_bucket} unavailable after 3 attempts")
        assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
    finally:
        server.cleanup()


def test_gcs_connection_refused_is_retried_then_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
    storage = storage_from_env({"STORAGE_BUCKET": "gs://gone"})
    with caplog.at_level(logging.WARNING, logger="kiosk_storage.base"), \
            pytest.raises(StorageUnavailable) as info:
        storage.download("in.tif", str(tmp_path))
    assert str(info.value).startswith("storage gs://gone unavailable after 3 attempts (download 'in.tif')")
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
    assert os.listdir(tmp_path) == []
