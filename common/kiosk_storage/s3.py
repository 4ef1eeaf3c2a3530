"""Amazon S3 and S3-compatible stores (MinIO, Ceph, moto) through boto3.

botocore's own retries are switched off (one attempt per call) so that
STORAGE_MAX_RETRY/STORAGE_BACKOFF alone bound how long a job waits. An endpoint
override (STORAGE_ENDPOINT, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) uses
path-style addressing, which every S3-compatible server understands.

Objects are private and shared as presigned GET URLs by default. With
STORAGE_PUBLIC=true every upload is made publicly readable with the canned ACL
``public-read`` and the output URL is the plain object URL. A bucket with ACLs
disabled (Object Ownership "bucket owner enforced", the default of new AWS
buckets) refuses that ACL; the upload is then repeated without it and a warning
says once that public access must come from the bucket policy, which is how the
Kiosk's S3 backend (which never set an ACL) expected public buckets to be made.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import shutil
import threading
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

from kiosk_storage.base import Fault, Location, Storage, StorageConfigError

log = logging.getLogger(__name__)

#: The canned ACL of STORAGE_PUBLIC uploads.
PUBLIC_ACL = "public-read"
#: The error of a bucket that does not accept ACLs (Object Ownership: bucket owner enforced).
_ACL_REFUSED = "AccessControlListNotSupported"
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "403", "401"}
_TRANSIENT = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError",
              "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException"}
# botocore exception class names for connection refused/reset, timeouts, truncated bodies.
_NETWORK_ERRORS = ("ConnectionError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError")


_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def s3_endpoint(configured: str = "", environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """The endpoint override in force, or '' for AWS itself."""
    env = os.environ if environ is None else environ
    return (configured or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", "")).rstrip("/")


class S3Storage(Storage):
    """Objects in an S3 bucket, optionally under a key prefix."""

    def __init__(self, location: Location, *, endpoint: str = "", **kwargs: object) -> None:
        super().__init__(location, **kwargs)  # type: ignore[arg-type]
        self.endpoint = s3_endpoint(endpoint)
        if self.endpoint and (urlsplit(self.endpoint).scheme not in ("http", "https")
                              or not urlsplit(self.endpoint).netloc):
            raise StorageConfigError(f"S3 endpoint {self.endpoint!r} must be an http:// or https:// URL")
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._acl_refused = False  # the bucket refused PUBLIC_ACL once: stop asking

    @property
    def client(self) -> Any:
        """The boto3 client, built on first use: importing boto3 and loading the S3 model
        costs about a second, which a worker should not pay before it is ready."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            signature_version="s3v4",
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            max_pool_connections=32,
        )
        global _SESSION
        with _SESSION_LOCK:  # one session per process: its loaded service model is reused
            if _SESSION is None:
                _SESSION = boto3.session.Session()
            return _SESSION.client(
                "s3", endpoint_url=self.endpoint or None, region_name=self.region, config=config)

    def _classify(self, exc: BaseException) -> Fault:
        import botocore.exceptions as bce

        if isinstance(exc, bce.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code == "NoSuchBucket":
                return Fault.NO_BUCKET
            if code in _MISSING or status == 404:
                return Fault.MISSING
            if code in _DENIED or status in (401, 403):
                return Fault.DENIED
            if code in _TRANSIENT or status >= 500 or status in (408, 429):
                return Fault.TRANSIENT
            return Fault.OTHER
        if isinstance(exc, bce.NoCredentialsError):
            return Fault.DENIED
        network = tuple(getattr(bce, name) for name in _NETWORK_ERRORS if hasattr(bce, name))
        if isinstance(exc, network) or isinstance(exc, (ConnectionError, TimeoutError)):
            return Fault.TRANSIENT
        return Fault.OTHER

    #: MAX_INPUT_BYTES is checked from the GET reply's Content-Length, before the body is read.
    size_on_get = True

    def _get_to_file(self, bucket: str, key: str, fh: BinaryIO) -> None:
        response = self.client.get_object(Bucket=bucket, Key=key)
        with response["Body"] as body:
            size = int(response.get("ContentLength") or 0)
            if 0 < self.max_input_bytes < size:
                raise self.too_big(key, size)
            shutil.copyfileobj(body, fh, 1 << 20)

    def _put_file(self, key: str, local_path: str) -> None:
        def put(acl: dict[str, str]) -> None:
            with open(local_path, "rb") as body:
                self.client.put_object(Bucket=self.location.bucket, Key=key, Body=body,
                                       ContentType=_content_type(key), **acl)

        self._put(put)

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._put(lambda acl: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data,
                                                     ContentType=_content_type(key), **acl))

    def _put(self, put: Any) -> None:
        """One upload, public-read when STORAGE_PUBLIC is set and the bucket accepts ACLs."""
        if not self.public or self._acl_refused:
            put({})
            return
        import botocore.exceptions as bce

        try:
            put({"ACL": PUBLIC_ACL})
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != _ACL_REFUSED:
                raise
            self._acl_refused = True
            log.warning("storage %s does not accept object ACLs (Object Ownership enforced): results are "
                        "uploaded without public-read; make them public with a bucket policy", self.url)
            put({})

    def _size(self, bucket: str, key: str) -> int:
        return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])

    def _exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if self._classify(exc) is Fault.MISSING:
                return False
            raise
        return True

    def _delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def _make_url(self, key: str) -> str:
        if self.public:
            quoted = quote(key, safe="/~")
            if self.endpoint:
                return f"{self.endpoint}/{self.location.bucket}/{quoted}"
            return f"https://{self.location.bucket}.s3.{self.region}.amazonaws.com/{quoted}"
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.location.bucket, "Key": key}, ExpiresIn=self.url_expiry)
