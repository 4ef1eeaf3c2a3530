"""requirements/lock.txt is complete and current, and the project venv is exactly the lock.

pyproject.toml states compatible ranges; the lock (``bash requirements/compile.sh``) pins every
package, transitive ones included, with hashes. Images and ``make venv`` install from it, so a
dependency added to pyproject.toml but not to the lock, a stale pin outside a range, or a
package installed by hand would make builds differ from what was tested. These tests catch each.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
EXTRAS = sorted(PYPROJECT["project"]["optional-dependencies"])
# Installed in the venv but not from the lock: our own editable packages and the installer.
NOT_LOCKED = {PROJECT, "kiosk-test-harness", "kiosk-example-consumer", "pip"}


def lock_entries(text: str) -> list[Requirement]:
    """Each pin of the lock as a Requirement (``name==version ; marker``), hashes dropped."""
    entries = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.split(" --hash")[0].split("#")[0].strip()
        if line:
            entries.append(Requirement(line))
    return entries


def applies(req: Requirement, extras: set[str] | None = None) -> bool:
    """Whether req holds in this interpreter's environment for one of the given extras."""
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in (extras or set()) | {""})


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"lock entry {req} is not an exact pin"
    return spec.version


LOCKED = lock_entries(LOCK.read_text())
# The pins that hold on this interpreter (the lock is universal: markers say where each applies).
PINS = {canonicalize_name(r.name): pinned_version(r) for r in LOCKED if applies(r)}


def project_requirements(extras: set[str]) -> list[Requirement]:
    """pyproject's requirements for the given extras, the project's own extras expanded."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    reqs, todo, seen = [], set(extras), set()
    reqs += [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                todo |= set(req.extras) - seen
            else:
                reqs.append(req)
    return reqs


def closure(extras: set[str]) -> dict[str, str]:
    """name -> installed version of every distribution the extras need, read from venv metadata."""
    found: dict[str, str] = {}
    todo = [(req, set()) for req in project_requirements(extras)]
    while todo:
        req, req_extras = todo.pop()
        if not applies(req, req_extras):
            continue
        name = canonicalize_name(req.name)
        wanted = set(req.extras)
        if name in found and not wanted:
            continue
        dist = metadata.distribution(req.name)
        found[name] = dist.version
        todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return found


def test_lock_header_names_the_regenerate_command() -> None:
    head = LOCK.read_text().splitlines()[:3]
    assert any("bash requirements/compile.sh" in line for line in head), head
    assert (ROOT / "requirements" / "compile.sh").is_file()


def test_every_lock_entry_is_pinned_with_hashes() -> None:
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 2)[2])
    assert len(blocks) == len(LOCKED)
    for block in blocks:
        assert "--hash=sha256:" in block, f"no hash: {block.splitlines()[0]}"
    names = [canonicalize_name(r.name) for r in LOCKED if applies(r)]
    assert len(names) == len(set(names)), "two pins of one package apply to this interpreter"


@pytest.mark.parametrize("extra", EXTRAS)
def test_every_requirement_of_every_extra_is_pinned_within_its_range(extra: str) -> None:
    for req in project_requirements({extra}):
        name = canonicalize_name(req.name)
        pins = [pinned_version(r) for r in LOCKED if canonicalize_name(r.name) == name]
        assert pins, f"{req} ([{extra}]) has no pin in requirements/lock.txt: bash requirements/compile.sh"
        for version in pins:
            assert req.specifier.contains(Version(version), prereleases=True), \
                f"lock pins {name}=={version} outside pyproject's {req} ([{extra}])"


def test_direct_requirements_use_compatible_ranges_not_pins() -> None:
    """Exact versions belong to the lock; pyproject.toml gives plugin authors room."""
    for req in project_requirements(set(EXTRAS)):
        for spec in req.specifier:
            assert spec.operator not in ("==", "==="), f"{req}: pin it in the lock, not in pyproject.toml"
        assert any(spec.operator in (">=", "~=") for spec in req.specifier), f"{req} has no lower bound"


def test_transitive_closure_of_every_extra_is_locked() -> None:
    """What pip actually installed for all extras (venv metadata) is exactly the lock's pins."""
    needed = closure(set(EXTRAS))
    missing = sorted(set(needed) - set(PINS))
    assert not missing, f"needed but not in the lock: {missing}"
    for name, version in needed.items():
        assert PINS[name] == version, f"{name}: venv has {version}, lock pins {PINS[name]}"
    stale = sorted(set(PINS) - set(needed))
    assert not stale, f"pinned but needed by no extra (stale; re-run bash requirements/compile.sh): {stale}"


def test_the_venv_is_exactly_the_lock() -> None:
    """Nothing installed differs from the lock: no other version, nothing unlocked, nothing missing."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    unlocked = sorted(set(installed) - set(PINS) - NOT_LOCKED)
    assert not unlocked, f"installed but not in requirements/lock.txt (declare it or uninstall it): {unlocked}"
    differ = {n: (v, PINS[n]) for n, v in installed.items() if n in PINS and PINS[n] != v}
    assert not differ, f"installed version != lock (make venv): {differ}"
    absent = sorted(set(PINS) - set(installed))
    assert not absent, f"locked but not installed (make venv): {absent}"


def test_images_and_make_venv_install_from_the_lock() -> None:
    for dockerfile in ("Dockerfile.worker", "Dockerfile.operator"):
        text = (ROOT / dockerfile).read_text()
        assert "COPY requirements/lock.txt requirements/lock.txt" in text, dockerfile
        assert re.search(r"--require-hashes\s+(\\\s+)?-c requirements/lock.txt", text), dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r requirements/lock.txt" in makefile
    assert "requirements/lock.txt" in makefile.split("\n$(STAMP):")[1].splitlines()[0]
