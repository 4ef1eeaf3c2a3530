"""The Kubernetes calls of the operator, as plain dicts in and out (I/O edge, no decisions).

Uses the official ``kubernetes`` client (sync; handlers run it in worker threads).
``None`` means "not found" for reads; other API errors propagate as ApiException.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from kiosk_protocol.crd import GROUP, PLURAL, VERSION

#: HTTP connections kept to the API server: at least the threads that call it at once (the
#: scaling executor and kopf's sync-handler threads). The client's default (5 per CPU) is smaller,
#: and every request beyond the pool opens, and throws away, a new TLS connection (a handshake on
#: both sides per request while 200 pools scale at once).
CONNECTION_POOL_SIZE = 96


def load_api_client(pool_size: int = CONNECTION_POOL_SIZE) -> k8s.ApiClient:
    """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config."""
    conf = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=conf)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=conf)
    conf.connection_pool_maxsize = pool_size
    return k8s.ApiClient(conf)


def _json(resp: Any) -> Any:
    data = resp.data
    return json.loads(data) if data else None


def _or_none(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return _json(call(*args, _preload_content=False, **kwargs))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


class Kube:
    """Thin, dict-based wrapper over the API groups the operator uses."""

    def __init__(self, api_client: k8s.ApiClient | None = None, request_timeout: float = 10.0) -> None:
        self.api_client = api_client or load_api_client()
        self.apps = k8s.AppsV1Api(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        self.batch = k8s.BatchV1Api(self.api_client)
        self.custom = k8s.CustomObjectsApi(self.api_client)
        self.timeout = request_timeout
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # -- deployments --

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _or_none(self.apps.read_namespaced_deployment, name, namespace, _request_timeout=self.timeout)

    def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        ns = body["metadata"]["namespace"]
        return _json(
            self.apps.create_namespaced_deployment(
                ns, body, _preload_content=False, _request_timeout=self.timeout
            )
        )

    def replace_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        return _json(
            self.apps.replace_namespaced_deployment(
                meta["name"], meta["namespace"], body, _preload_content=False, _request_timeout=self.timeout
            )
        )

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(
            name,
            namespace,
            {"spec": {"replicas": int(replicas)}},
            _request_timeout=self.timeout,
            _preload_content=False,
        )

    # -- pods --

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        data = _json(
            self.core.list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False, _request_timeout=self.timeout
            )
        )
        return data.get("items", [])

    def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod(
                name, namespace, patch, _preload_content=False, _request_timeout=self.timeout
            )
        except ApiException as exc:
            if exc.status != 404:  # a pod that just went away needs no annotation
                raise

    # -- pools --

    def get_pool(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _or_none(
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            _request_timeout=self.timeout,
        )

    def patch_pool_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                _preload_content=False,
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status != 404:  # the pool was deleted meanwhile
                raise

    # -- secrets --

    def read_secret(self, namespace: str, name: str, max_age: float = 30.0) -> dict[str, Any]:
        """A whole Secret (data still base64), cached briefly: pools read theirs every polling interval.

        A changed Secret is seen within ``max_age`` (its metadata.resourceVersion tells callers).
        Raises LookupError when it does not exist (reported as SecretMissing).
        """
        cache_key = (namespace, name)
        now = time.monotonic()
        with self._lock:
            hit = self._secrets.get(cache_key)
            if hit and now - hit[0] < max_age:
                return hit[1]
        secret = _or_none(self.core.read_namespaced_secret, name, namespace, _request_timeout=self.timeout)
        if secret is None:
            raise LookupError(f"Secret {namespace}/{name} not found")
        with self._lock:
            self._secrets[cache_key] = (now, secret)
        return secret

    def secret_value(self, namespace: str, name: str, key: str, max_age: float = 30.0) -> str:
        """One key of a Secret, decoded (cached with the Secret)."""
        raw = (self.read_secret(namespace, name, max_age).get("data") or {}).get(key)
        if raw is None:
            raise LookupError(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(raw).decode()
