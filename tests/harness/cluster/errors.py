"""The local cluster's exceptions."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """Something about the local cluster went wrong."""


class ClusterStartError(ClusterError):
    """A control-plane process failed to start; the message has its log tail."""


class ApiError(ClusterError):
    """The API server answered with an HTTP error (``.status`` is e.g. 404 or 409)."""

    def __init__(self, method: str, path: str, status: int, body: str):
        self.method, self.path, self.status, self.body = method, path, status, body
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")


class ApiUnreachable(ClusterError, ConnectionError):
    """No HTTP answer from the API server (refused, reset, TLS failure, timeout); an OSError."""
