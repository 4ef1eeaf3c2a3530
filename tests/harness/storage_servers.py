"""Real storage servers for tests: moto (S3) and fake-gcs-server (GCS), on loopback ports.

S3: moto in server mode, run as its own ``moto_server`` process, so boto3 in
the test process talks real HTTP and nothing in botocore is patched.

GCS: fake-gcs-server (github.com/fsouza/fake-gcs-server), built once from its
Go module through the module proxy into ``${KIOSK_CACHE:-~/.cache/kiosk-operator}/bin``
(``go install github.com/fsouza/fake-gcs-server@v1.56.1``), run with the
in-memory backend over plain HTTP. Chosen over the PyPI gcp-storage-emulator
because it implements the JSON API that google-cloud-storage 3.x uses
unchanged (multipart and resumable uploads, ``alt=media`` downloads, 404 bodies)
through ``STORAGE_EMULATOR_HOST`` or ``client_options={"api_endpoint": ...}``
with AnonymousCredentials; signed URLs are never needed from the server
(anonymous clients fall back to the media link, which it serves).
Prebuild it with ``python -m harness.storage_servers build`` run from tests/.

FlakyProxy is a tiny HTTP proxy in front of either server that answers the
next N requests with a chosen status (e.g. 503) before forwarding again: real
5xx responses over real HTTP, for retry tests, without mocking a client.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from harness.ports import free_port
from harness.procs import ServerProcess
from harness.wait import wait_for

FAKE_GCS_VERSION = "v1.56.1"
FAKE_GCS_MODULE = "github.com/fsouza/fake-gcs-server"

# Fake credentials: moto accepts any; real ones must never leak into tests.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def cache_dir() -> Path:
    return Path(os.environ.get("KIOSK_CACHE") or Path.home() / ".cache" / "kiosk-operator")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 30) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-800:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status < 500
        except urllib.error.HTTPError as exc:
            return exc.code < 500
        except OSError:
            return False

    wait_for(ready, timeout=timeout, message=f"{what} to answer on {url}", interval=0.05)


class _Process(ServerProcess):
    """A server subprocess with a log file; start/stop/restart on the same port."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"kiosk-{self.name}-"))
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        return self.endpoint

    def start(self) -> Any:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            _wait_http(self.ready_url(), self.proc, self.log, self.name)
        except BaseException:
            self.stop()
            raise
        return self



class MotoS3Server(_Process):
    """moto in server mode (S3 API on http://127.0.0.1:port)."""

    name = "moto"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return f"{self.endpoint}/moto-api/"

    def env(self) -> dict[str, str]:
        """Worker environment for this server (fake credentials + endpoint)."""
        return {**AWS_TEST_ENV, "STORAGE_ENDPOINT": self.endpoint}

    def client(self) -> Any:
        """A boto3 S3 client for this server (cached: building one costs ~0.3 s)."""
        if getattr(self, "_client", None) is None:
            import boto3

            self._client = boto3.session.Session(
                aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
            ).client("s3", endpoint_url=self.endpoint)
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"kiosk-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def fake_gcs_binary(build: bool = True) -> Path:
    """Path of the cached fake-gcs-server binary, building it with `go install` if missing."""
    bindir = cache_dir() / "bin"
    target = bindir / f"fake-gcs-server-{FAKE_GCS_VERSION}"
    if target.exists() or not build:
        return target
    go = shutil.which("go")
    if not go:
        raise RuntimeError("Go is required to build fake-gcs-server (the GCS emulator used by the tests)")
    bindir.mkdir(parents=True, exist_ok=True)
    with open(bindir / ".fake-gcs-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes
        if target.exists():
            return target
        gobin = Path(tempfile.mkdtemp(prefix=".gobin-fgcs.", dir=bindir))
        try:
            env = {**os.environ, "GOBIN": str(gobin), "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
            result = subprocess.run([go, "install", f"{FAKE_GCS_MODULE}@{FAKE_GCS_VERSION}"], env=env,
                                    capture_output=True, text=True, timeout=1800)
            if result.returncode != 0:
                raise RuntimeError(f"building fake-gcs-server failed: {result.stderr.strip()[-800:]}")
            os.replace(gobin / "fake-gcs-server", target)
        finally:
            shutil.rmtree(gobin, ignore_errors=True)
    return target


class FakeGcsServer(_Process):
    """fake-gcs-server over HTTP with an in-memory backend."""

    name = "fake-gcs"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.binary = fake_gcs_binary()

    def command(self) -> list[str]:
        return [
            str(self.binary), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
            "-port", str(self.port), "-public-host", f"127.0.0.1:{self.port}",
            "-external-url", self.endpoint, "-log-level", "warn",
        ]

    def ready_url(self) -> str:
        return f"{self.endpoint}/storage/v1/b"

    def env(self) -> dict[str, str]:
        """Worker environment: the library's standard emulator variable (anonymous access)."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"kiosk-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(name)
        return name


_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}


class FlakyProxy:
    """HTTP proxy to ``target`` that fails the next N requests with a chosen status.

    ``requests`` counts every request received (failed or forwarded), so tests
    can assert exactly how many attempts a client made.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests = 0
        self._fail = 0
        self._status = 503
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy._fail > 0
                    if fail:
                        proxy._fail -= 1
                    status = proxy._status
                if fail:
                    payload = f"injected {status}".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="flaky-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail, self._status = n, status

    def start(self) -> FlakyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- pytest fixtures (import them into a test module or conftest) -----------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGcsServer]:
    server = FakeGcsServer().start()
    yield server
    server.cleanup()


@pytest.fixture()
def s3_bucket(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the test's environment points boto3 at moto with fake credentials."""
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    return s3_server.create_bucket()


@pytest.fixture()
def gcs_bucket(gcs_server: FakeGcsServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; STORAGE_EMULATOR_HOST points google-cloud-storage at the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    return gcs_server.create_bucket()


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        print(fake_gcs_binary())
        return 0
    print("usage: python -m harness.storage_servers build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
