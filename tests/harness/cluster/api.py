"""Programmatic access to the API server, through the ``kubernetes`` Python client.

The harness talks to the API one way: ``KubeApi`` (raw paths and JSON bodies over one
``kubernetes.client.ApiClient``; ``apply`` is server-side apply). kubectl is only run where a
test wants kubectl itself (LocalCluster.kubectl).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from .errors import ApiError, ApiUnreachable

FIELD_MANAGER = "kiosk-harness"


class KubeApi:
    """The API of the cluster in ``kubeconfig``, as that kubeconfig's user.

    ``request`` returns parsed JSON (text for answers that are not JSON, such as ``/readyz``'s
    "ok"; None for an empty body) and raises ApiError on HTTP errors, ApiUnreachable (an OSError) when no
    HTTP answer came.
    """

    def __init__(self, kubeconfig: os.PathLike | str):
        self.kubeconfig = kubeconfig
        self._client: k8s_client.ApiClient | None = None
        self._lock = threading.Lock()
        self._resources: dict[str, dict[str, tuple[str, bool]]] = {}  # apiVersion -> kind -> (plural, namespaced)

    def new_client(self) -> k8s_client.ApiClient:
        """A new ``kubernetes.client.ApiClient`` (for typed APIs and watches, e.g. in other threads)."""
        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    @property
    def client(self) -> k8s_client.ApiClient:
        with self._lock:
            if self._client is None:
                self._client = self.new_client()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ----------------------------------------------------------------- requests

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30,
                content_type: str = "application/json", query: Mapping[str, str] | None = None) -> Any:
        if isinstance(body, (bytes, str)) and "json" in content_type:
            body = json.loads(body)
        try:
            resp = self.client.call_api(
                path, method, query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body, auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout)
        except k8s_client.ApiException as exc:
            if not exc.status:  # the client's code for a TLS failure
                raise ApiUnreachable(f"{method} {path}: {exc.reason}") from None
            body_text = exc.body if isinstance(exc.body, str) else (exc.body or b"").decode(errors="replace")
            raise ApiError(method, path, exc.status, body_text) from None
        except urllib3.exceptions.HTTPError as exc:
            raise ApiUnreachable(f"{method} {path}: {exc!r}") from None
        raw = resp.data
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def exists(self, path: str) -> bool:
        try:
            self.request("GET", path)
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    # ----------------------------------------------------------------- apply

    def apply(self, manifest: str | Mapping[str, Any] | Iterable[Mapping[str, Any]],
              namespace: str | None = None) -> list[dict[str, Any]]:
        """Server-side apply (forced) of every object of ``manifest``: YAML or JSON text (several
        documents and ``kind: List`` allowed) or objects. Namespaced objects without a namespace
        go to ``namespace`` (default "default"). Returns the objects as the server stored them."""
        return [
            self.request("PATCH", self.object_path(obj, namespace), obj, content_type="application/apply-patch+yaml",
                         query={"fieldManager": FIELD_MANAGER, "force": "true"})
            for obj in _objects(manifest)
        ]

    def object_path(self, obj: Mapping[str, Any], namespace: str | None = None) -> str:
        """The API path of ``obj`` (its kind resolved through discovery)."""
        api_version, kind, meta = obj["apiVersion"], obj["kind"], obj.get("metadata") or {}
        plural, namespaced = self.resource(api_version, kind)
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if namespaced:
            base += f"/namespaces/{meta.get('namespace') or namespace or 'default'}"
        return f"{base}/{plural}/{meta['name']}"

    def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(plural resource name, namespaced) of ``kind``; rediscovered on a miss (new CRDs)."""
        known = self._resources.get(api_version, {})
        if kind not in known:
            path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            known = {r["kind"]: (r["name"], r["namespaced"])
                     for r in self.get(path)["resources"] if "/" not in r["name"]}
            self._resources[api_version] = known
            if kind not in known:
                raise ApiError("GET", path, 404, f"the server serves no kind {kind!r} in {api_version}")
        return known[kind]


def _objects(manifest: str | Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(manifest, str):
        docs = [d for d in yaml.safe_load_all(manifest) if d]
    elif isinstance(manifest, Mapping):
        docs = [manifest]
    else:
        docs = list(manifest)
    out: list[dict[str, Any]] = []
    for doc in docs:
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            out.extend(_objects(doc.get("items") or []))
        else:
            out.append(dict(doc))
    return out
