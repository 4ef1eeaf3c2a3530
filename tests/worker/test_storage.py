"""Storage backends against real servers: moto (S3), fake-gcs-server (GCS), a local directory."""
# The storage-server fixtures are imported from the harness and then named as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    InputRefused,
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


def _s3_public_grants(server: MotoS3Server, bucket: str, key: str) -> list[dict]:
    grants = server.client().get_object_acl(Bucket=bucket, Key=key)["Grants"]
    return [g for g in grants if g.get("Grantee", {}).get("URI", "").endswith("/global/AllUsers")]


def _anonymous_get(url: str) -> bytes:
    """A GET with no credentials at all, as a browser following output_url."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def test_s3_public_objects_are_public_read(s3_server: MotoS3Server, s3_bucket: str, input_file: Path) -> None:
    """STORAGE_PUBLIC=true: every upload gets the canned ACL public-read (as the Kiosk's GCS
    uploads got publicRead) and anyone can fetch the plain output URL."""
    storage = storage_from_env({"STORAGE_BUCKET": f"s3://{s3_bucket}", "STORAGE_ENDPOINT": s3_server.endpoint,
                                "STORAGE_PUBLIC": "true"})
    name, url = storage.upload(str(input_file))
    data_name, data_url = storage.upload_data(PAYLOAD[:1000], "result.zip")
    assert url == f"{s3_server.endpoint}/{s3_bucket}/{name}" and "X-Amz-Signature" not in url
    assert _anonymous_get(url) == PAYLOAD
    assert _anonymous_get(data_url) == PAYLOAD[:1000]
    for key in (name, data_name):
        assert [g["Permission"] for g in _s3_public_grants(s3_server, s3_bucket, key)] == ["READ"]


def test_s3_private_by_default(s3_server: MotoS3Server, s3_bucket: str, input_file: Path) -> None:
    storage = storage_from_env({"STORAGE_BUCKET": f"s3://{s3_bucket}", "STORAGE_ENDPOINT": s3_server.endpoint})
    name, url = storage.upload(str(input_file))
    assert not _s3_public_grants(s3_server, s3_bucket, name)
    with pytest.raises(urllib.error.HTTPError) as info:  # the object itself: refused
        _anonymous_get(f"{s3_server.endpoint}/{s3_bucket}/{name}")
    assert info.value.code == 403
    assert "X-Amz-Signature" in url and _anonymous_get(url) == PAYLOAD  # the output URL: signed


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


def _gcs_acl(server: FakeGcsServer, bucket: str, key: str) -> list[dict]:
    blob = server.client().bucket(bucket).blob(key)
    blob.acl.reload()
    return [dict(entry) for entry in blob.acl]


def test_gcs_public_objects_are_public_read(gcs_server: FakeGcsServer, gcs_bucket: str, input_file: Path) -> None:
    """STORAGE_PUBLIC=true: uploads carry predefinedAcl=publicRead, as the Kiosk's GCS uploads did."""
    storage = storage_from_env({"STORAGE_BUCKET": f"gs://{gcs_bucket}", "STORAGE_PUBLIC": "true"})
    name, url = storage.upload(str(input_file))
    data_name, data_url = storage.upload_data(PAYLOAD[:1000], "result.zip")
    assert url == f"{gcs_server.endpoint}/{gcs_bucket}/{name}"
    assert _anonymous_get(url) == PAYLOAD
    assert _anonymous_get(data_url) == PAYLOAD[:1000]
    for key in (name, data_name):
        assert {"entity": "allUsers", "role": "READER"} in _gcs_acl(gcs_server, gcs_bucket, key)


class TokenServer:
    """An OAuth token endpoint for service-account credentials: any JWT gets a bearer token."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps({"access_token": "test-token", "expires_in": 3600,
                                   "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _service_account_client(endpoint: str, token_uri: str = "http://127.0.0.1:1/token") -> object:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.cloud import storage as gcs
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    creds = service_account.Credentials.from_service_account_info({
        "type": "service_account", "client_email": "worker@test.iam.gserviceaccount.com",
        "private_key": pem, "private_key_id": "1", "token_uri": token_uri, "project_id": "test",
    })
    return gcs.Client(project="test", credentials=creds, client_options={"api_endpoint": endpoint})


def test_gcs_private_by_default(gcs_server: FakeGcsServer, input_file: Path) -> None:
    """Default: no allUsers entry on the object, and the output URL is a V4 signed URL."""
    bucket = gcs_server.create_bucket()
    tokens = TokenServer()
    try:
        client = _service_account_client(gcs_server.endpoint, tokens.url)
        storage = GCSStorage(parse_bucket_url(f"gs://{bucket}"), client=client, url_expiry=900, max_retry=0)
        name, url = storage.upload(str(input_file))
    finally:
        tokens.stop()
    assert not [e for e in _gcs_acl(gcs_server, bucket, name) if e["entity"] == "allUsers"]
    query = parse_qs(urlsplit(url).query)
    assert "X-Goog-Signature" in query and query["X-Goog-Expires"] == ["900"]
    assert url.startswith(f"{gcs_server.endpoint}/{bucket}/")
    assert _anonymous_get(url) == PAYLOAD  # the emulator does not check signatures


def test_gcs_signed_url_with_service_account_key(gcs_server: FakeGcsServer, gcs_bucket: str) -> None:
    """Credentials with a private key produce a V4 signed URL (signing is local, no server call)."""
    client = _service_account_client(gcs_server.endpoint)
    storage = GCSStorage(parse_bucket_url(f"gs://{gcs_bucket}"), client=client, url_expiry=900)
    query = parse_qs(urlsplit(storage.url_for("out/x.zip")).query)
    assert query["X-Goog-Expires"] == ["900"]
    assert query["X-Goog-Credential"][0].startswith("worker@test.iam.gserviceaccount.com/")
    assert "X-Goog-Signature" in query


class AclRefusingProxy:
    """In front of moto or fake-gcs-server: refuses uploads that carry an object ACL with the
    cloud's own error (an S3 bucket with Object Ownership "bucket owner enforced", a GCS bucket
    with uniform bucket-level access); forwards everything else. Neither emulator does this."""

    S3_ERROR = (400, "application/xml", b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error>"
                b"<Code>AccessControlListNotSupported</Code><Message>The bucket does not allow ACLs</Message>"
                b"<RequestId>1</RequestId><HostId>1</HostId></Error>")
    GCS_ERROR = (400, "application/json", json.dumps({"error": {
        "code": 400, "message": "Cannot insert legacy ACL for an object when uniform bucket-level access is "
        "enabled. Read more at https://cloud.google.com/storage/docs/uniform-bucket-level-access",
        "errors": [{"message": "Cannot insert legacy ACL", "domain": "global", "reason": "invalid"}]}}).encode())

    def __init__(self, target_port: int, kind: str) -> None:
        self.refused = 0
        proxy = self
        status, content_type, error = self.S3_ERROR if kind == "s3" else self.GCS_ERROR

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(code)
                for key, value in headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("x-amz-acl") or "predefinedAcl=" in self.path:
                    proxy.refused += 1
                    self._reply(status, [("Content-Type", content_type)], error)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self._reply(resp.status, resp.getheaders(), resp.read())
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_public_upload_to_a_bucket_refusing_acls_falls_back_once(
        kind: str, request: pytest.FixtureRequest, input_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bucket that refuses object ACLs: the upload is repeated without one, a warning says so once,
    and later uploads do not ask again (public access then comes from the bucket's own policy)."""
    server = request.getfixturevalue("s3_server" if kind == "s3" else "gcs_server")
    bucket = request.getfixturevalue("s3_bucket" if kind == "s3" else "gcs_bucket")
    proxy = AclRefusingProxy(server.port, kind)
    try:
        storage = storage_from_env({"STORAGE_BUCKET": f"{kind}://{bucket}", "STORAGE_ENDPOINT": proxy.endpoint,
                                    "STORAGE_PUBLIC": "true"})
        with caplog.at_level(logging.WARNING, logger=f"kiosk_storage.{'s3' if kind == 's3' else 'gcs'}"):
            first, _ = storage.upload(str(input_file))
            second, _ = storage.upload_data(b"zip", "result.zip")
    finally:
        proxy.stop()
    assert proxy.refused == 1
    assert storage.read_bytes(first) == PAYLOAD and storage.read_bytes(second) == b"zip"
    warnings = [r.getMessage() for r in caplog.records if "ACL" in r.getMessage()]
    assert len(warnings) == 1 and f"{kind}://{bucket}" in warnings[0]
    if kind == "s3":
        assert not _s3_public_grants(server, bucket, first)


def test_local_url_is_plain_path_and_escapes_rejected(tmp_path: Path, input_file: Path) -> None:
    root = tmp_path / "store"
    storage = storage_from_env({"STORAGE_BUCKET": f"file://{root}"})
    name, url = storage.upload(str(input_file), "out")
    assert url == str(root / name)
    assert Path(url).read_bytes() == PAYLOAD
    assert storage.read_bytes(f"file://{root}/{name}") == PAYLOAD
    for bad in ("../secret.tif", "/etc/passwd", "file:///etc/passwd"):
        with pytest.raises(StorageError, match=r"outside|'\.\.' segment"):
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
    # two 500s, then the GET (S3 checks MAX_INPUT_BYTES from its Content-Length; GCS asks first)
    assert proxy.requests - before == (3 if kind == "s3" else 4)


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


# --- hostile input_file_name (fields come from a public form) ---------------------------------


def test_urls_outside_the_bucket_or_prefix_are_refused(backend: Factory, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    """A full URL reaches only the configured bucket and prefix: the worker's credentials must
    not read other buckets (which exist and hold the object here, on the real server)."""
    storage = backend()
    storage.upload_bytes(b"mine", "in.tif")
    scheme = storage.location.scheme
    if scheme == "file":
        other = tmp_path / "other"
        other_url = f"file://{other}"
    else:
        server = request.getfixturevalue("s3_server" if scheme == "s3" else "gcs_server")
        other_url = f"{scheme}://{server.create_bucket()}/jobs"
    other_storage = open_storage(other_url, endpoint=getattr(storage, "endpoint", ""), max_retry=0)
    other_storage.upload_bytes(b"theirs", "in.tif")
    assert other_storage.read_bytes("in.tif") == b"theirs"

    assert storage.read_bytes(f"{storage.url}/in.tif") == b"mine"  # the same bucket: fine
    refused = [f"{other_url}/in.tif", "sub/../in.tif", f"{storage.url}/sub/../in.tif"]
    if scheme != "file":  # the same bucket, outside the prefix 'jobs'
        refused.append(f"{scheme}://{storage.location.bucket}/elsewhere/in.tif")
    for name in refused:
        with pytest.raises(InputRefused) as info:
            storage.download(name, str(tmp_path / "dl"))
        assert "\n" not in str(info.value) and ("outside" in str(info.value) or "'..'" in str(info.value))
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())


def test_inputs_over_max_input_bytes_are_refused_before_download(backend: Factory, tmp_path: Path) -> None:
    storage = backend(MAX_INPUT_BYTES=str(len(PAYLOAD) - 1))
    storage.upload_bytes(PAYLOAD, "big.tif")
    for fetch in (storage.download, storage.readable_path):
        with pytest.raises(InputRefused, match=rf"is {len(PAYLOAD)} bytes, over the limit of "
                                               rf"{len(PAYLOAD) - 1} \(MAX_INPUT_BYTES\)"):
            fetch("big.tif", str(tmp_path / "dl"))
    assert not any((tmp_path / "dl").iterdir())  # nothing written, not even a partial file
    exact = backend(MAX_INPUT_BYTES=str(len(PAYLOAD)))
    assert Path(exact.download("big.tif", str(tmp_path / "ok"))).read_bytes() == PAYLOAD
    with pytest.raises(InputNotFound):  # a missing input is still "not found"
        storage.download("nope.tif", str(tmp_path / "dl"))


def test_local_symlinks_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    secret = tmp_path / "secret.tif"
    secret.write_bytes(b"secret")
    (root / "real.tif").write_bytes(b"fine")
    (root / "out.tif").symlink_to(secret)
    (root / "in.tif").symlink_to(root / "real.tif")
    (root / "dir").symlink_to(tmp_path)
    storage = storage_from_env({"STORAGE_BUCKET": f"file://{root}"})
    assert storage.read_bytes("real.tif") == b"fine"
    for name in ("out.tif", "in.tif", "dir/secret.tif", f"file://{root}/out.tif"):
        for fetch in (storage.download, storage.readable_path):
            with pytest.raises(InputRefused, match="symbolic link"):
                fetch(name, str(tmp_path / "dl"))
    with pytest.raises(InputRefused, match="symbolic link"):
        storage.upload_bytes(b"x", "dir/planted.txt")
    assert not (tmp_path / "planted.txt").exists()


def test_storage_retry_waits_follow_storage_backoff_settings(tmp_path: Path) -> None:
    """STORAGE_BACKOFF is the first wait and STORAGE_MAX_BACKOFF the cap of every wait."""
    store = storage_from_env({"STORAGE_BUCKET": f"file://{tmp_path}", "STORAGE_BACKOFF": "0.2",
                              "STORAGE_MAX_BACKOFF": "7"})
    assert (store.backoff, store.max_backoff) == (0.2, 7.0)
    default = storage_from_env({"STORAGE_BUCKET": f"file://{tmp_path}"})
    assert default.max_backoff == 60.0
