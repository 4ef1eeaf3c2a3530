"""Google Cloud Storage through google-cloud-storage.

The library's own retry policies are turned off per call (``retry=None``) so
that STORAGE_MAX_RETRY/STORAGE_BACKOFF alone bound a job's wait.

Endpoint: STORAGE_ENDPOINT (an API endpoint such as ``http://127.0.0.1:4443``)
or the library's standard STORAGE_EMULATOR_HOST. Credentials: the application
default ones; with an emulator, or when none can be found, anonymous ones
(public or emulated buckets only, logged as a warning).

Output URLs are V4 signed URLs, valid SIGNED_URL_EXPIRY seconds. Signing needs
a private key, or a service-account e-mail plus an access token (GKE workload
identity signs through the IAM API). When the credentials can do neither
(anonymous, emulator) the worker falls back to the object's plain media-link
URL and says so once in the log.

STORAGE_PUBLIC=true uploads every object with the predefined ACL ``publicRead``
(as the Kiosk's GCS backend did) and returns its public URL. A bucket with
uniform bucket-level access refuses object ACLs; the upload is then repeated
without one and a warning says once that public access must be granted on the
bucket (allUsers as Storage Object Viewer).
"""

from __future__ import annotations

import datetime
import http.client
import logging
import mimetypes
import os
import threading
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

from kiosk_storage.base import Fault, Location, Storage

if TYPE_CHECKING:
    from google.cloud import storage

log = logging.getLogger(__name__)

# (connect, read) seconds for each HTTP request.
TIMEOUT = (5.0, 60.0)
#: The predefined ACL of STORAGE_PUBLIC uploads.
PUBLIC_ACL = "publicRead"


def _transient_types() -> tuple[type[BaseException], ...]:
    import google.api_core.exceptions as gexc
    import google.auth.exceptions as gauth
    import requests.exceptions as rexc
    import urllib3.exceptions
    from google.cloud.storage import exceptions as sexc

    return (
        gexc.ServerError, gexc.TooManyRequests,
        rexc.ConnectionError, rexc.Timeout, rexc.ChunkedEncodingError,
        gauth.TransportError, urllib3.exceptions.HTTPError, http.client.HTTPException,
        sexc.DataCorruption, ConnectionError, TimeoutError,
    )


def make_client(endpoint: str = "") -> storage.Client:
    """A client for the real service, an API endpoint override, or an emulator."""
    import google.auth
    import google.auth.exceptions as gauth
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    options: dict[str, Any] | None = {"api_endpoint": endpoint.rstrip("/")} if endpoint else None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The library's emulator mode: anonymous, no credential lookup (and no metadata-server probe).
        return storage.Client(project=project or "kiosk", client_options=options)
    try:
        credentials, default_project = google.auth.default(
            scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
    except gauth.DefaultCredentialsError:
        log.warning("no Google credentials found: using anonymous access to storage")
        return storage.Client(project=project or "kiosk", credentials=AnonymousCredentials(),
                              client_options=options)
    return storage.Client(project=project or default_project, credentials=credentials,
                          client_options=options)


def _quiet(client: storage.Client) -> storage.Client:
    """Turn off google-cloud-storage 3.x's bucket-metadata prefetch: for tracing it issues a
    background GET of the bucket with its own retries, traffic outside our retry bounds."""
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        client._bucket_metadata_cache = None
    return client


class GCSStorage(Storage):
    """Objects in a GCS bucket, optionally under a key prefix."""

    def __init__(self, location: Location, *, endpoint: str = "", client: storage.Client | None = None,
                 **kwargs: object) -> None:
        super().__init__(location, **kwargs)  # type: ignore[arg-type]
        self.endpoint = endpoint
        self._client = _quiet(client) if client is not None else None
        self._client_lock = threading.Lock()
        self._warned_unsigned = False
        self._acl_refused = False  # uniform bucket-level access refused PUBLIC_ACL once: stop asking

    @property
    def client(self) -> storage.Client:
        """The client, built on first use: importing google-cloud-storage costs ~0.5 s."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = _quiet(make_client(self.endpoint))
        return self._client

    @property
    def api_endpoint(self) -> str:
        return str(self.client.api_endpoint or "https://storage.googleapis.com").rstrip("/")

    def _blob(self, bucket: str, key: str) -> storage.Blob:
        return self.client.bucket(bucket).blob(key)

    def _classify(self, exc: BaseException) -> Fault:
        import google.api_core.exceptions as gexc
        import google.auth.exceptions as gauth
        from google.cloud.storage import exceptions as sexc

        if isinstance(exc, gexc.NotFound):
            text = str(exc).lower()
            if "bucket does not exist" in text or "no such bucket" in text:
                return Fault.NO_BUCKET
            return Fault.MISSING
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized, gauth.RefreshError)):
            return Fault.DENIED
        if isinstance(exc, sexc.InvalidResponse):
            status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
            if status == 404:
                return Fault.MISSING
            return Fault.TRANSIENT if status >= 500 or status in (408, 429) else Fault.OTHER
        if isinstance(exc, gexc.GoogleAPICallError) and exc.code in (408, 429):
            return Fault.TRANSIENT
        if isinstance(exc, _transient_types()):
            return Fault.TRANSIENT
        return Fault.OTHER

    def _get_to_file(self, bucket: str, key: str, fh: BinaryIO) -> None:
        self._blob(bucket, key).download_to_file(fh, retry=None, timeout=TIMEOUT)

    def _put_file(self, key: str, local_path: str) -> None:
        blob = self._blob(self.location.bucket, key)
        self._put(lambda acl: blob.upload_from_filename(local_path, retry=None, timeout=TIMEOUT,
                                                        predefined_acl=acl))

    def _put_bytes(self, key: str, data: bytes) -> None:
        blob = self._blob(self.location.bucket, key)
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        self._put(lambda acl: blob.upload_from_string(data, content_type=content_type, retry=None,
                                                      timeout=TIMEOUT, predefined_acl=acl))

    def _put(self, put: Any) -> None:
        """One upload, publicRead when STORAGE_PUBLIC is set and the bucket accepts object ACLs."""
        if not self.public or self._acl_refused:
            put(None)
            return
        import google.api_core.exceptions as gexc
        from google.cloud.storage import exceptions as sexc

        try:
            put(PUBLIC_ACL)
        except (gexc.BadRequest, sexc.InvalidResponse) as exc:
            if "uniform bucket-level access" not in str(exc).lower():
                raise
            self._acl_refused = True
            log.warning("storage %s has uniform bucket-level access, which refuses object ACLs: results "
                        "are uploaded without publicRead; grant allUsers read access on the bucket", self.url)
            put(None)

    def _size(self, bucket: str, key: str) -> int:
        import google.api_core.exceptions as gexc

        blob = self.client.bucket(bucket).get_blob(key, retry=None, timeout=TIMEOUT)
        if blob is None:
            raise gexc.NotFound(f"object {key} not found")
        return int(blob.size or 0)

    def _exists(self, bucket: str, key: str) -> bool:
        return bool(self._blob(bucket, key).exists(retry=None, timeout=TIMEOUT))

    def _delete(self, bucket: str, key: str) -> None:
        self._blob(bucket, key).delete(retry=None, timeout=TIMEOUT)

    def media_url(self, key: str) -> str:
        """The JSON API download link (``?alt=media``): needs the caller's own access."""
        return (f"{self.api_endpoint}/download/storage/v1/b/{self.location.bucket}/o/"
                f"{quote(key, safe='')}?alt=media")

    def _make_url(self, key: str) -> str:
        import google.auth.exceptions as gauth
        from google.auth.credentials import AnonymousCredentials

        blob = self._blob(self.location.bucket, key)
        if self.public:
            return str(blob.public_url)
        expiration = datetime.timedelta(seconds=self.url_expiry)
        credentials = self.client._credentials
        if not isinstance(credentials, AnonymousCredentials):
            try:
                return str(blob.generate_signed_url(version="v4", expiration=expiration, method="GET"))
            except (AttributeError, TypeError, ValueError, gauth.TransportError):
                if getattr(credentials, "service_account_email", None):
                    # No private key (GKE workload identity, GCE): sign through the IAM API.
                    try:
                        return self._sign_with_iam(blob, expiration)
                    except Exception as exc:  # noqa: BLE001 - any failure means "cannot sign"
                        log.debug("IAM signing failed: %s", exc)
        if not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("storage %s: credentials cannot sign URLs; output_url is the plain media link",
                        self.url)
        return self.media_url(key)

    def _sign_with_iam(self, blob: storage.Blob, expiration: datetime.timedelta) -> str:
        import google.auth.transport.requests as greq

        credentials = self.client._credentials
        if not credentials.valid:
            credentials.refresh(greq.Request())
        # Read after refresh: GCE credentials only learn their real e-mail ("default" before).
        email = credentials.service_account_email
        return str(blob.generate_signed_url(version="v4", expiration=expiration, method="GET",
                                            service_account_email=email, access_token=credentials.token))
