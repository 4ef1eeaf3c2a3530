"""The operator's permission set and the RBAC objects built from it, for tests and benchmarks.

One source of truth: ``rbac_rules.yaml`` in the kiosk_operator package (the Helm chart
symlinks it); the tests bind a ServiceAccount to exactly these rules with the builders below.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

RULES_FILE = Path(str(resources.files("kiosk_operator").joinpath("rbac_rules.yaml")))


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, Any], ...]:
    data = yaml.safe_load(RULES_FILE.read_text())
    return tuple(data["rules"])


def rules() -> list[dict[str, Any]]:
    """A fresh copy of the rules list (safe to modify)."""
    return copy.deepcopy(list(_load()))


def service_account(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def role(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": rules(),
    }


def cluster_role(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": rules(),
    }


def role_binding(
    name: str, namespace: str, sa_name: str, sa_namespace: str | None = None, cluster: bool = False
) -> dict[str, Any]:
    """RoleBinding (or ClusterRoleBinding with cluster=True) of the ServiceAccount to the role."""
    meta: dict[str, Any] = {"name": name} if cluster else {"name": name, "namespace": namespace}
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding" if cluster else "RoleBinding",
        "metadata": meta,
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole" if cluster else "Role",
            "name": name,
        },
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace or namespace}],
    }


def namespaced_manifests(name: str, namespace: str) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding: the default, namespaced install."""
    return [service_account(name, namespace), role(name, namespace), role_binding(name, namespace, name)]
