"""Dockerfiles without a Docker engine: hadolint, structure, and each image's venv rebuilt for real.

The image installs the ``.[worker,gcs,s3]`` / ``.[operator]`` extras into a venv from the lock
(requirements/lock.txt, hash-checked). Here we (1) resolve those extras against the package
index exactly as the image build would (``pip install --dry-run --require-hashes -c lock``),
and (2) build a fresh venv holding only the distributions of those extras (linked from the
project venv) plus the project, then run the image's ENTRYPOINT command and import every
module of the image's packages in it. Anything outside the extras (TensorFlow, kopf in the
worker, ...) is simply not importable there. tests/packaging/test_images.py builds them for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]

LOCK = ROOT / "requirements" / "lock.txt"
IMAGES = {
    # dockerfile: (extras, entrypoint, other scripts shipped, packages imported wholesale, forbidden dists)
    "Dockerfile.worker": ("worker,gcs,s3", "kiosk-worker", ["kiosk-model-server"],
                          ["kiosk_worker", "kiosk_model_server", "kiosk_protocol", "kiosk_storage"],
                          {"tensorflow", "tensorflow-cpu", "keras", "kopf"}),
    "Dockerfile.operator": ("operator", "kiosk-operator", [], ["kiosk_operator", "kiosk_protocol"],
                            {"tensorflow", "tensorflow-cpu", "numpy", "scipy", "scikit-image"}),
}
SOURCE_ROOTS = ("common", "worker", "operator", "cli")
# Modules that are not part of the image's job (demo drivers need the whole project).
SKIP_MODULES = re.compile(r"(^|\.)(demo|tests?)(\.|$)")


# --- Dockerfile text ---------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_hadolint_is_clean(dockerfile: str) -> None:
    result = subprocess.run([str(HADOLINT), "--no-color", str(ROOT / dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_structure(dockerfile: str) -> None:
    extra, entry, _, _, _ = IMAGES[dockerfile]
    ins = instructions(ROOT / dockerfile)
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for args in froms:
        image = args.split()[0]
        pinned = re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image)
        assert pinned, f"base not a pinned slim python: {image}"
    build_runs = " ".join(args for word, args in ins if word == "RUN")
    args = dict(a.split("=", 1) for word, a in ins if word == "ARG" and "=" in a)
    installs = re.findall(r"\[([^\]]+)\]", build_runs)
    assert [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], i) for i in installs] == [extra], \
        f"the build stage must install the .[{extra}] extras"
    assert re.search(r"--require-hashes\s+-c requirements/lock.txt", build_runs), "install from the lock (hashes)"
    assert re.search(r"pip==\d+(\.\d+)+", build_runs) and re.search(r"setuptools==\d+(\.\d+)+", build_runs)

    final = final_stage(ROOT / dockerfile)
    final_runs = " ".join(args for word, args in final if word == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "make "):
        assert tool not in final_runs, f"build tool in the final stage: {tool}"
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "the final stage copies only the venv"
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "must run as non-root"
    assert re.fullmatch(r"\d+:\d+", users[-1]), "numeric USER lets runAsNonRoot verify it"
    entrypoints = [args for word, args in final if word == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == [entry]
    assert entry in SCRIPTS


def test_dockerignore_keeps_context_small() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**", "deny everything first, then allow what the images need"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "LICENSE", "requirements/lock.txt", "common", "worker",
                       "operator", "cli"}
    for dockerfile in IMAGES:
        for word, args in instructions(ROOT / dockerfile):
            if word == "COPY" and not args.startswith("--from"):
                for src in args.split()[:-1]:
                    assert src.rstrip("/") in allowed, f"{dockerfile} copies {src}: .dockerignore excludes it"
                    assert (ROOT / src).exists()


# --- the image's Python environment ------------------------------------------------------------


def extra_closure(extra: str) -> dict[str, metadata.Distribution]:
    """Every distribution `pip install .[extra]` brings in (extra: comma-separated), from venv metadata."""
    project = metadata.distribution("kiosk-operator")
    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(r), set(extra.split(","))) for r in project.requires or []]
    while todo:
        req, extras = todo.pop()
        env = default_environment()
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
            continue
        name = canonicalize_name(req.name)
        if name == "kiosk-operator":
            todo.extend((Requirement(r), set(req.extras)) for r in project.requires or [])
            continue
        if name in found:
            continue
        dist = metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{req} but {dist.version} installed"
        found[name] = dist
        todo.extend((Requirement(r), set(req.extras)) for r in dist.requires or [])
    return found


def link_distributions(dists: dict[str, metadata.Distribution], site: Path) -> None:
    """Symlink each installed file of the given distributions into site (only those files)."""
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        for rel in dist.files or []:
            if rel.parts and rel.parts[0] == "..":
                continue  # console scripts of the dependency
            src = base / rel
            dest = site / rel
            if not src.exists() or dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(src)


DRIVER = r"""
import importlib, json, pkgutil, re, sys
from io import StringIO
import contextlib
entry, scripts, packages, skip = json.loads(sys.argv[1])
result = {"help": {}, "failed_imports": {}}
for name, target in scripts.items():
    module, func = target.split(":")
    out = StringIO()
    code = None
    with contextlib.redirect_stdout(out):
        try:
            sys.argv = [name, "--help"]
            code = getattr(importlib.import_module(module), func)()
        except SystemExit as exc:
            code = exc.code
    result["help"][name] = [code, out.getvalue()]
for pkg in packages:
    root = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(root.__path__, pkg + "."):
        if re.search(skip, info.name):
            continue
        try:
            importlib.import_module(info.name)
        except BaseException as exc:
            result["failed_imports"][info.name] = f"{type(exc).__name__}: {exc}"
result["modules"] = sorted(sys.modules)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def image_venvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh venv per image with only its extra's distributions and the project on sys.path."""
    venvs = {}
    for dockerfile, (extra, *_rest) in IMAGES.items():
        venv = tmp_path_factory.mktemp(f"venv-{extra.replace(',', '-')}")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        (site,) = venv.glob("lib/python3.*/site-packages")
        link_distributions(extra_closure(extra), site)
        (site / "kiosk_project.pth").write_text("".join(f"{ROOT / root}\n" for root in SOURCE_ROOTS))
        venvs[dockerfile] = venv
    return venvs


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_entrypoint_starts_with_only_its_extra(dockerfile: str, image_venvs, tmp_path: Path) -> None:
    extra, entry, others, packages, forbidden = IMAGES[dockerfile]
    venv = image_venvs[dockerfile]
    closure = set(extra_closure(extra))
    assert not closure & forbidden, f"the {extra} extra pulls in {sorted(closure & forbidden)}"
    scripts = {name: SCRIPTS[name] for name in [entry, *others]}
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", DRIVER,
         json.dumps([entry, scripts, packages, SKIP_MODULES.pattern])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    for name, (code, out) in report["help"].items():
        assert code in (0, None) and "usage:" in out, f"`{name} --help` failed with .[{extra}]: {code} {out}"
    assert report["failed_imports"] == {}, f"modules that do not import with only .[{extra}]"
    top_level = {m.split(".")[0] for m in report["modules"]}
    assert "tensorflow" not in top_level and "keras" not in top_level


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """This checkout as a wheel and its pip hash (how the image build names it to pip)."""
    dist = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("*.whl")
    hashed = subprocess.run([sys.executable, "-m", "pip", "hash", str(wheel)], check=True, capture_output=True,
                            text=True, timeout=60).stdout.split()[-1]
    return wheel, hashed


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_locked_extras_resolve_like_the_image_build(dockerfile: str, project_wheel, tmp_path: Path) -> None:
    """What the build stage's hash-checked install would take: the lock's versions, no TensorFlow."""
    extra, _, _, _, forbidden = IMAGES[dockerfile]
    wheel, hashed = project_wheel
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"{wheel}[{extra}] {hashed}\n")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--prefer-binary",
         "--require-hashes", "-c", str(LOCK), "-r", str(requirements), "--report", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert not set(resolved) & forbidden
    pins = {canonicalize_name(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", LOCK.read_text(), re.M)}
    for name, version in resolved.items():
        if name != "kiosk-operator":
            assert pins.get(name) == version, f"{name} {version} resolved, lock pins {pins.get(name)}"
    assert set(extra_closure(extra)) <= set(resolved)
