"""The ConsumerPool CRD the operator ships, and the API server's defaulting of it.

consumerpool.yaml next to this file is the one copy of the CRD (crds/consumerpool.yaml and
the Helm chart link to it). ``apply_defaults`` fills in a spec the way the API server
does, so a pool read from a file in local mode gets the same defaults as one read from
the cluster. (The CRD's coordinates, group, version and kind, are in kiosk_protocol.crd.)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from kiosk_protocol.crd import VERSION

FILE_NAME = "consumerpool.yaml"


@lru_cache(maxsize=1)
def definition() -> dict[str, Any]:
    """The CustomResourceDefinition, read once from the package (shared: do not modify)."""
    text = resources.files(__package__).joinpath(FILE_NAME).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def schema(version: str = VERSION) -> dict[str, Any]:
    """The openAPIV3Schema of one served version of the ConsumerPool."""
    for served in definition()["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise KeyError(f"the ConsumerPool CRD has no version {version!r}")


def spec_schema(version: str = VERSION) -> dict[str, Any]:
    """The schema of a ConsumerPool's ``spec``."""
    return schema(version)["properties"]["spec"]


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """A copy of ``value`` with the structural ``schema``'s defaults filled in, as the API server does.

    A declared property that is null (and not ``nullable: true``) is dropped; one that is
    missing then gets a copy of its ``default``. Objects (``properties``,
    ``additionalProperties``) and array ``items`` are walked, the defaults just set
    included, so ``default: {}`` brings the defaults of its own properties. Values of the
    wrong type are left alone for the caller to report.
    """
    if isinstance(value, Mapping):
        props: Mapping[str, Any] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: dict[Any, Any] = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, Mapping) else None)
            if item is None and key in props and not sub.get("nullable", False):
                continue
            out[key] = copy.deepcopy(item) if sub is None else apply_defaults(item, sub)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = apply_defaults(copy.deepcopy(sub["default"]), sub)
        return out
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, Mapping):
        return [apply_defaults(item, items) for item in value]
    return copy.deepcopy(value)
