"""The admin policy over ConsumerPools (pure): what a namespace user may put in a pool.

A ConsumerPool author is a namespace user; the operator acts with its own ServiceAccount.
The policy is set by the cluster admin in the chart's values (``policy:``), rendered into
the operator's environment as ``KIOSK_POLICY`` (JSON) and, the same values, into a
ValidatingAdmissionPolicy (helm/kiosk-operator/templates/admission-policy.yaml) so the API
server refuses a violating pool. The operator checks again (``violations``): a pool created
before the policy, or while the admission policy was off, gets a PolicyViolation condition
and a Warning Event naming the field, and nothing is created or scaled up for it; a worker
Deployment the pool already owns is scaled to 0 and kept, so lifting the refusal restores it.

Always on, whatever the policy: the operator reads only Secrets labelled
``SECRET_LABEL: "true"`` (``secret_allowed``), and touches only Deployments owned by the
pool (``owned_by``) or a model-server Deployment labelled ``MODEL_SERVER_LABEL: "true"``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiosk_operator.spec import PoolSpec
from kiosk_protocol.crd import GROUP

#: A Secret the operator may read for a pool (spec.redis.passwordSecretRef) carries this label "true".
SECRET_LABEL = f"{GROUP}/pool-secret"
#: A Deployment not owned by the pool that spec.modelServer.deployment may scale carries this label "true".
MODEL_SERVER_LABEL = f"{GROUP}/model-server"
#: The environment variable holding the policy as JSON (rendered by the chart).
POLICY_ENV = "KIOSK_POLICY"
#: Namespaces the operator never acts in, even with --all-namespaces.
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
#: Volume sources a pool may use under any policy that lists none (no hostPath, no Secret of its choosing).
DEFAULT_VOLUME_TYPES = ("emptyDir", "configMap", "persistentVolumeClaim", "ephemeral")
#: env[].valueFrom sources that read nothing secret: always allowed.
SAFE_VALUE_FROM = ("fieldRef", "resourceFieldRef")
#: The worker images' user; the default runAsUser of worker pods.
WORKER_UID = 10001
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


@dataclass(frozen=True)
class Policy:
    """The admin's decisions. ``Policy()`` is the chart's default (restrictive where it matters)."""

    #: Worker images must start with one of these; empty: any image.
    allowed_image_prefixes: tuple[str, ...] = ()
    #: spec.worker.serviceAccountName must be one of these; empty: only the namespace's "default".
    allowed_service_accounts: tuple[str, ...] = ()
    #: env[].valueFrom with secretKeyRef/configMapKeyRef (fieldRef/resourceFieldRef are always fine).
    allow_value_from: bool = False
    allow_env_from: bool = False
    #: Any toleration at all; when False, only tolerations of allowed_toleration_keys (never an empty key).
    allow_tolerations: bool = False
    allowed_toleration_keys: tuple[str, ...] = ("nvidia.com/gpu",)
    #: Hosts (exact names) a pool's Redis password may be sent to; empty: Services of the pool's namespace only.
    allowed_redis_hosts: tuple[str, ...] = ()
    #: Volume source kinds spec.worker.volumes may use.
    allowed_volume_types: tuple[str, ...] = DEFAULT_VOLUME_TYPES
    #: Whether spec.worker.securityContext/podSecurityContext may loosen the restricted defaults.
    allow_privilege_overrides: bool = False
    #: spec.worker.priorityClassName must be one of these ("*": any); empty: the field must be empty,
    #: since a high PriorityClass lets a pool preempt other teams' pods.
    allowed_priority_classes: tuple[str, ...] = ()
    #: Secrets spec.worker.imagePullSecrets may name ("*": any); empty: none, since the kubelet pulls
    #: with credentials the pool's author cannot read.
    allowed_image_pull_secrets: tuple[str, ...] = ()
    #: spec.modelServer.deployment must carry MODEL_SERVER_LABEL unless the pool owns it.
    require_model_server_label: bool = True
    #: False only for an operator started without a policy (tests, local development).
    configured: bool = True

    @classmethod
    def permissive(cls) -> Policy:
        """No admin policy configured: pod fields unchecked (the Secret label and ownership still apply)."""
        return cls(
            allow_value_from=True,
            allow_env_from=True,
            allow_tolerations=True,
            allowed_service_accounts=("*",),
            allowed_redis_hosts=("*",),
            allowed_volume_types=("*",),
            allowed_priority_classes=("*",),
            allowed_image_pull_secrets=("*",),
            require_model_server_label=False,
            configured=False,
        )


_KEYS = {
    "allowedImagePrefixes": "allowed_image_prefixes",
    "allowedServiceAccounts": "allowed_service_accounts",
    "allowValueFrom": "allow_value_from",
    "allowEnvFrom": "allow_env_from",
    "allowTolerations": "allow_tolerations",
    "allowedTolerationKeys": "allowed_toleration_keys",
    "allowedRedisHosts": "allowed_redis_hosts",
    "allowedVolumeTypes": "allowed_volume_types",
    "allowPrivilegeOverrides": "allow_privilege_overrides",
    "allowedPriorityClasses": "allowed_priority_classes",
    "allowedImagePullSecrets": "allowed_image_pull_secrets",
    "requireModelServerLabel": "require_model_server_label",
}


def parse_policy(data: Mapping[str, Any]) -> Policy:
    """The chart's ``policy:`` values (camelCase) as a Policy; ValueError naming an unknown or bad key."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            raise ValueError(f"policy.{key}: unknown key (known: {', '.join(sorted(_KEYS))})")
        attr = _KEYS[key]
        if isinstance(getattr(Policy(), attr), tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"policy.{key}: must be a list of strings")
            kwargs[attr] = tuple(value)
        else:
            if not isinstance(value, bool):
                raise ValueError(f"policy.{key}: must be true or false")
            kwargs[attr] = value
    return Policy(**kwargs)


def load_policy(environ: Mapping[str, str] = os.environ) -> Policy:
    """KIOSK_POLICY (JSON) when set, else ``Policy.permissive()``."""
    raw = environ.get(POLICY_ENV, "").strip()
    if not raw:
        return Policy.permissive()
    data = json.loads(raw)
    if not isinstance(data, Mapping):
        raise ValueError(f"{POLICY_ENV}: must be a JSON object")
    return parse_policy(data)


_excluded: tuple[str, ...] = ()


def exclude_namespaces(names: tuple[str, ...]) -> None:
    """Refuse every pool in these namespaces (--all-namespaces: the system ones and the operator's own)."""
    global _excluded
    _excluded = tuple(names)


def excluded_namespaces() -> tuple[str, ...]:
    return _excluded


@functools.cache
def current() -> Policy:
    """The operator process's policy (KIOSK_POLICY, read once; __main__ reads it at start-up)."""
    return load_policy()


# --- checks ----------------------------------------------------------------------------------


def redis_host_allowed(policy: Policy, host: str, namespace: str) -> bool:
    """May a Secret be sent to ``host``? Listed hosts, or (empty list) a Service of ``namespace``."""
    if "*" in policy.allowed_redis_hosts:
        return True
    if policy.allowed_redis_hosts:
        return host in policy.allowed_redis_hosts
    pattern = rf"{_DNS_LABEL}(\.{re.escape(namespace)}(\.svc(\.cluster\.local)?)?)?"
    return re.fullmatch(pattern, host) is not None


def _allowed(values: tuple[str, ...], value: str) -> bool:
    return "*" in values or value in values


# runAsNonRoot etc. that a pool may set only to the restricted value (or leave out).
_TIGHT = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
}


def _security_context(sc: Mapping[str, Any], path: str) -> list[str]:
    out = []
    for key, want in _TIGHT.items():
        if key in sc and sc[key] != want:
            out.append(f"{path}.{key}: must be {json.dumps(want)} under the cluster's policy")
    if "runAsUser" in sc and (not isinstance(sc["runAsUser"], int) or sc["runAsUser"] == 0):
        out.append(f"{path}.runAsUser: must not be 0 (root)")
    if "runAsGroup" in sc and sc["runAsGroup"] == 0:
        out.append(f"{path}.runAsGroup: must not be 0 (root)")
    if (sc.get("capabilities") or {}).get("add"):
        out.append(f"{path}.capabilities.add: adding capabilities is not allowed")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"{path}.seccompProfile.type: must be RuntimeDefault or Localhost")
    for key in ("seLinuxOptions", "windowsOptions", "procMount", "appArmorProfile", "sysctls"):
        if key in sc:
            out.append(f"{path}.{key}: not allowed under the cluster's policy")
    return out


def violations(policy: Policy, spec: PoolSpec, namespace: str) -> list[str]:
    """Every field of ``spec`` the policy refuses, one line each naming the field; [] when allowed."""
    w, out = spec.worker, []
    if policy.allowed_image_prefixes and not any(w.image.startswith(p) for p in policy.allowed_image_prefixes):
        out.append(
            f"spec.worker.image: {w.image!r} is not under an allowed prefix "
            f"({', '.join(policy.allowed_image_prefixes)})"
        )
    sa = w.service_account_name
    if sa and sa != "default" and not _allowed(policy.allowed_service_accounts, sa):
        out.append(f"spec.worker.serviceAccountName: {sa!r} is not an allowed ServiceAccount")
    if not policy.allow_value_from:
        for i, item in enumerate(w.env):
            source = item.get("valueFrom") or {}
            for kind in source:
                if kind not in SAFE_VALUE_FROM:
                    out.append(f"spec.worker.env[{i}].valueFrom.{kind}: not allowed (only fieldRef, resourceFieldRef)")
    if w.env_from and not policy.allow_env_from:
        out.append("spec.worker.envFrom: not allowed under the cluster's policy")
    if not policy.allow_tolerations:
        for i, tol in enumerate(w.tolerations):
            key = tol.get("key") or ""
            if key not in policy.allowed_toleration_keys:
                out.append(f"spec.worker.tolerations[{i}].key: {key!r} is not an allowed toleration key")
    for i, volume in enumerate(w.volumes):
        for kind in volume:
            if kind != "name" and not _allowed(policy.allowed_volume_types, kind):
                out.append(f"spec.worker.volumes[{i}].{kind}: volume type not allowed")
    pc = w.priority_class_name
    if pc and not _allowed(policy.allowed_priority_classes, pc):
        out.append(f"spec.worker.priorityClassName: {pc!r} is not an allowed PriorityClass")
    for i, name in enumerate(w.image_pull_secrets):
        if not _allowed(policy.allowed_image_pull_secrets, name):
            out.append(f"spec.worker.imagePullSecrets[{i}].name: {name!r} is not an allowed image pull Secret")
    if not policy.allow_privilege_overrides:
        out += _security_context(w.security_context, "spec.worker.securityContext")
        out += _security_context(w.pod_security_context, "spec.worker.podSecurityContext")
    r = spec.redis
    if r.password_secret_ref is not None:
        hosts = [h.rsplit(":", 1)[0] for h in r.sentinel.hosts] if r.sentinel else [r.host]
        field = "spec.redis.sentinel.hosts" if r.sentinel else "spec.redis.host"
        for host in hosts:
            if not redis_host_allowed(policy, host, namespace):
                out.append(
                    f"{field}: {host!r} may not receive spec.redis.passwordSecretRef "
                    "(not an allowed Redis host; default: Services of the pool's namespace)"
                )
    return out


def secret_allowed(secret: Mapping[str, Any]) -> bool:
    """Has the Secret opted in to being read by the operator for a pool?"""
    labels = (secret.get("metadata") or {}).get("labels") or {}
    return labels.get(SECRET_LABEL) == "true"


def owned_by(obj: Mapping[str, Any], pool: Mapping[str, Any]) -> bool:
    """Is ``obj`` owned (ownerReferences uid) by ``pool``?"""
    uid = (pool.get("metadata") or {}).get("uid")
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return uid is not None and any(ref.get("uid") == uid for ref in refs)


def model_server_allowed(policy: Policy, deployment: Mapping[str, Any], pool: Mapping[str, Any]) -> bool:
    """May the pool scale this model-server Deployment? Owned by the pool, or opted in with the label."""
    if owned_by(deployment, pool):
        return True
    labels = (deployment.get("metadata") or {}).get("labels") or {}
    return labels.get(MODEL_SERVER_LABEL) == "true" or not policy.require_model_server_label
