"""Has someone changed a Deployment we own? Pure comparison of what we render with what exists.

The API server adds defaults (extra keys) and normalises resource quantities, so
the check is "every field we set has our value" with quantities compared by value;
lists must match item for item (an added env var or container is drift).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

# Parts of a Deployment the operator owns; replicas belong to the scaling loop.
OWNED_PATHS: tuple[tuple[str, ...], ...] = (
    ("metadata", "labels"),
    ("metadata", "ownerReferences"),
    ("spec", "selector"),
    ("spec", "template"),
)


def _quantity(value: Any) -> Decimal | None:
    try:
        return parse_quantity(value)
    except (ValueError, TypeError):
        return None


def differences(want: Any, have: Any, path: str = "") -> list[str]:
    """Paths where ``have`` does not carry ``want`` (``want`` keys are a subset of ``have``)."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return [path or "/"]
        out: list[str] = []
        for key, value in want.items():
            out += differences(value, have.get(key), f"{path}.{key}")
        return out
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return [path]
        out = []
        for i, (w, h) in enumerate(zip(want, have, strict=True)):
            out += differences(w, h, f"{path}[{i}]")
        return out
    if want == have:
        return []
    if ".resources." in path and want is not None and have is not None:
        qw, qh = _quantity(want), _quantity(have)
        if qw is not None and qw == qh:
            return []
    if isinstance(want, int | float) and isinstance(have, str) and str(want) == have:
        return []
    return [path]


def extra_containers(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """Containers of ``have`` that ``want`` does not define (someone added a sidecar) are drift too."""
    w = want.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    h = have.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    return [] if len(w) == len(h) else [".spec.template.spec.containers"]


def deployment_drift(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """Owned fields of the live Deployment ``have`` that differ from the rendered ``want``."""
    out: list[str] = []
    for path in OWNED_PATHS:
        w, h = want, have
        for part in path:
            w = w.get(part, {}) if isinstance(w, dict) else {}
            h = h.get(part, {}) if isinstance(h, dict) else {}
        out += differences(w, h, "." + ".".join(path))
    return out + extra_containers(want, have)
