"""Our container images, built locally with buildah and no registry, cached by their inputs.

No registry is reachable here, so the base our Dockerfiles name (``python:3.11.13-slim-bookworm``)
is made from Debian: ``debootstrap --variant=minbase`` plus Python, committed under that same
reference into a buildah storage of our own ($KIOSK_CACHE/buildah), where it never shadows a
real pull. ``Dockerfile.worker`` and ``Dockerfile.operator`` are then built unchanged
(``buildah bud --layers --pull=never``) with the host's CA bundle and pip configuration
bind-mounted read-only, because pip inside the build must trust these machines' TLS
interception; bind mounts are not committed, so none of it stays in an image.

Each image is exported to ``$KIOSK_CACHE/images/<name>-<key>.tar`` (docker-archive, what
``ctr images import`` takes), ``key`` being a hash of everything the build reads, so a warm
run only hashes files. The base's Debian inputs and package versions are recorded in
``tools/images/images.lock``: the mirror keeps only the current point release, so a cold base
build compares what it got with the lock and updates it (or fails, with ``--check`` or
KIOSK_IMAGES_LOCK=check).

    python -m harness.images build [base|worker|operator ...]
"""

from __future__ import annotations

import argparse
import configparser
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_LOCK = REPO_ROOT / "tools" / "images" / "images.lock"
BASE_REF = "docker.io/library/python:3.11.13-slim-bookworm"
# What the base stand-in is made of; any change here is a new base (and new images on it).
BASE_RECIPE = {
    "recipe": "debootstrap-minbase-v2",
    "reference": BASE_REF,
    "suite": "bookworm",
    "variant": "minbase",
    # python3-pip so that the pip{,3} links of the official image lead somewhere.
    "include": ["ca-certificates", "netbase", "python3", "python3-pip", "python3-venv"],
    "links": {"/usr/local/bin/python": "/usr/bin/python3", "/usr/local/bin/python3": "/usr/bin/python3",
              "/usr/local/bin/pip": "/usr/bin/pip3", "/usr/local/bin/pip3": "/usr/bin/pip3"},
    "remove": ["/usr/lib/python3.11/EXTERNALLY-MANAGED"],
    "env": {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    "cmd": ["python3"],
}
# name -> (Dockerfile, reference pods use with imagePullPolicy Never, default build args)
DOCKERFILES: dict[str, tuple[str, str]] = {
    "worker": ("Dockerfile.worker", "localhost/kiosk-worker:dev"),
    "operator": ("Dockerfile.operator", "localhost/kiosk-operator:dev"),
}
NAMES = ("base", *DOCKERFILES)
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBOOTSTRAP_STEPS = ("I: Retrieving Release", "I: Resolving", "I: Unpacking the base", "I: Configuring the base",
                     "I: Base system installed")


class ImageBuildError(RuntimeError):
    """A build step failed; the message names the step and the log with the details."""


@dataclass(frozen=True)
class BuiltImage:
    """An image in our buildah storage and in an archive that ``ctr images import`` takes."""

    name: str
    ref: str
    archive: Path
    key: str
    built: bool  # False when the archive was already cached

    @property
    def size(self) -> int:
        """Bytes of the (uncompressed) archive: close to the image's size."""
        return self.archive.stat().st_size


# --------------------------------------------------------------------------- places and tools


def cache_dir() -> Path:
    return Path(os.environ.get("KIOSK_CACHE") or Path.home() / ".cache" / "kiosk-operator")


def archives_dir() -> Path:
    return cache_dir() / "images"


def storage_dir() -> Path:
    return cache_dir() / "buildah"


def progress(message: str) -> None:
    """One progress line on stderr (stdout stays free for callers that parse it)."""
    print(f"images: {message}", file=sys.stderr, flush=True)


def buildah_argv(*args: str) -> list[str]:
    """buildah on our own storage: nothing shared with (or shadowing) the system's images."""
    storage = storage_dir()
    return ["buildah", f"--root={storage / 'root'}", f"--runroot={storage / 'runroot'}",
            "--storage-driver=overlay", *args]


def buildah(*args: str, timeout: float = 600) -> str:
    """Run buildah on our storage; its stdout, or ImageBuildError with its stderr."""
    proc = subprocess.run(buildah_argv(*args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ImageBuildError(f"buildah {' '.join(args[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def runtime() -> list[str]:
    """--runtime=runc when present: crun refuses the hybrid cgroup layout of these machines."""
    runc = shutil.which("runc")
    return [f"--runtime={runc}"] if runc else []


def require_tools(*tools: str) -> None:
    """Fail with one line naming what is missing (make deps installs them)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageBuildError(f"missing {' '.join(missing)}: apt-get install {' '.join(missing)} (make deps)")
    if os.geteuid() != 0:
        raise ImageBuildError("building images needs root (debootstrap, buildah overlay storage)")


@contextmanager
def build_lock() -> Iterator[None]:
    """One builder at a time per cache (parallel pytest processes, make images)."""
    archives_dir().mkdir(parents=True, exist_ok=True)
    with open(archives_dir() / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def has_image(ref: str) -> bool:
    return subprocess.run(buildah_argv("inspect", "--type", "image", ref), capture_output=True).returncode == 0


def run_logged(argv: Sequence[str], log: Path, what: str, step_prefix: tuple[str, ...] = (),
               timeout: float = 1800) -> None:
    """Run argv with its output in log; echo lines starting with a step_prefix as progress."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            out.write(line)
            if step_prefix and re.sub(r"^\[\d+/\d+\] ", "", line).startswith(step_prefix):
                progress(f"{what}: {line.strip()[:150]}")
            if time.monotonic() > deadline:
                proc.kill()
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise ImageBuildError(f"{what} failed ({code}); log {log}:\n{tail}")


# --------------------------------------------------------------------------- hashing


def digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def dockerignore() -> tuple[list[str], list[str]]:
    """(included roots, excluded patterns) of the repository's .dockerignore (allow-list form)."""
    include, exclude = [], []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "**":
            continue
        if line.startswith("!"):
            include.append(line[1:].rstrip("/"))
        else:
            exclude.append(line)
    return include, exclude


def context_files() -> list[Path]:
    """Every file of the build context, as .dockerignore lets it through, sorted."""
    include, exclude = dockerignore()

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        for pattern in exclude:
            tail = pattern.removeprefix("**/")
            if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(p, tail) for p in parts):
                return True
        return False

    files = []
    for root in include:
        path = REPO_ROOT / root
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in candidates if not excluded(p.relative_to(REPO_ROOT).as_posix())]
    return sorted(files)


def base_key() -> str:
    recipe = {**BASE_RECIPE, "mirror": debian_mirror()[0]}
    return digest([json.dumps(recipe, sort_keys=True).encode()])


def dockerfile_key(name: str, build_args: dict[str, str]) -> str:
    dockerfile, ref = DOCKERFILES[name]
    # The mounts are part of it: buildah may leave a mount point behind (see host_mounts).
    parts = [base_key().encode(), ref.encode(), json.dumps([build_args, host_mounts()], sort_keys=True).encode(),
             (REPO_ROOT / dockerfile).read_bytes(), (REPO_ROOT / ".dockerignore").read_bytes()]
    for path in context_files():
        parts += [path.relative_to(REPO_ROOT).as_posix().encode(), path.read_bytes()]
    return digest(parts)


# --------------------------------------------------------------------------- base image


def debian_mirror() -> tuple[str, str, str]:
    """(mirror URI, snapshot comment, keyring) apt on this machine uses for Debian's main suite."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                if BASE_RECIPE["suite"] in suites and "/debian" in fields.get("URIs", ""):
                    snapshot = re.search(r"^#\s*(\S*snapshot\S*)", stanza, re.M)
                    return (fields["URIs"].split()[0], snapshot.group(1) if snapshot else "",
                            fields.get("Signed-By", ""))
        else:
            for line in text.splitlines():
                m = re.match(r"deb\s+(\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and m.group(3) == BASE_RECIPE["suite"] and "/debian" in m.group(2):
                    keyring = re.search(r"signed-by=(\S+?)[\s\]]", m.group(1) or "")
                    return m.group(2), "", keyring.group(1) if keyring else ""
    return "http://deb.debian.org/debian", "", ""


def dpkg_versions(rootfs: Path) -> dict[str, str]:
    """Package -> version of what is installed in rootfs (read from dpkg's status file)."""
    versions = {}
    for stanza in (rootfs / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            arch = fields.get("Architecture", "")
            name = fields["Package"] if arch in ("all", "", host_arch()) else f"{fields['Package']}:{arch}"
            versions[name] = fields["Version"]
    return dict(sorted(versions.items()))


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()


def release_of(rootfs: Path) -> tuple[str, str]:
    """(point release, date) of the suite debootstrap read: the mirror's state it built from."""
    for path in sorted((rootfs / "var/lib/apt/lists").glob("*_Release")) + sorted(
            (rootfs / "var/lib/apt/lists").glob("*_InRelease")):
        fields = dict(re.findall(r"^(Version|Date): (.*)$", path.read_text(errors="replace"), re.M))
        if fields:
            return fields.get("Version", ""), fields.get("Date", "")
    return "", ""


def render_lock(mirror: str, release: tuple[str, str], packages: dict[str, str]) -> str:
    """images.lock text: the base's Debian inputs, then each installed package's version."""
    lines = [
        "# Inputs of the base image stand-in, written by `python -m harness.images build base`",
        "# (tests/harness/images.py). The Debian mirror serves the suite's current point release",
        "# only: a cold base build compares what it installed with this file and updates it (or",
        "# fails with --check / KIOSK_IMAGES_LOCK=check). Commit it when it changes.",
        "[base]",
        f"reference = {json.dumps(BASE_REF)}",
        f"recipe = {json.dumps(BASE_RECIPE['recipe'])}",
        f"suite = {json.dumps(BASE_RECIPE['suite'])}",
        f"variant = {json.dumps(BASE_RECIPE['variant'])}",
        f"mirror = {json.dumps(mirror)}",
        f"release = {json.dumps(release[0])}",
        f"release_date = {json.dumps(release[1])}",
        f"include = {json.dumps(BASE_RECIPE['include'])}",
        f"architecture = {json.dumps(host_arch())}",
        "",
        "[base.packages]",
        *(f"{json.dumps(name)} = {json.dumps(version)}" for name, version in packages.items()),
    ]
    return "\n".join(lines) + "\n"


def read_lock() -> dict:
    return tomllib.loads(IMAGES_LOCK.read_text()) if IMAGES_LOCK.exists() else {}


def check_lock(text: str, check: bool) -> None:
    """Compare the base just built with images.lock; update it, or fail in check mode."""
    old = IMAGES_LOCK.read_text() if IMAGES_LOCK.exists() else ""
    if old == text:
        progress("base: matches tools/images/images.lock")
        return
    before = tomllib.loads(old).get("base", {}).get("packages", {}) if old else {}
    after = tomllib.loads(text)["base"]["packages"]
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    summary = ", ".join(f"{n} {before.get(n, '-')} -> {after.get(n, '-')}" for n in changed[:8]) if before else ""
    if check:
        raise ImageBuildError(f"base differs from tools/images/images.lock ({len(changed)} packages: {summary});"
                              " rebuild without --check to update it")
    IMAGES_LOCK.parent.mkdir(parents=True, exist_ok=True)
    IMAGES_LOCK.write_text(text)
    what = f"{len(changed)} packages changed: {summary}" if changed else ("new" if not old else "inputs changed")
    progress(f"base: wrote tools/images/images.lock ({what}) - commit it")


def build_base_rootfs(rootfs: Path, log: Path) -> tuple[str, tuple[str, str]]:
    """debootstrap the stand-in's root filesystem; returns (mirror, (point release, its date))."""
    mirror, _snapshot, keyring = debian_mirror()
    debs = archives_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    argv = ["debootstrap", f"--variant={BASE_RECIPE['variant']}", f"--include={','.join(BASE_RECIPE['include'])}",
            f"--cache-dir={debs}"]
    if keyring:
        argv.append(f"--keyring={keyring}")
    argv += [BASE_RECIPE["suite"], str(rootfs), mirror]
    progress(f"base: debootstrap {BASE_RECIPE['suite']} from {mirror} (about 2 minutes cold)")
    run_logged(argv, log, "base debootstrap", step_prefix=DEBOOTSTRAP_STEPS)
    for link, target in BASE_RECIPE["links"].items():
        path = rootfs / link.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    release = release_of(rootfs)
    for gone in BASE_RECIPE["remove"]:
        (rootfs / gone.lstrip("/")).unlink(missing_ok=True)
    # What a slim image leaves out: package caches, indexes, docs.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                 "usr/share/info", "var/log"):
        target = rootfs / junk
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock":
                    child.unlink()
    return mirror, release


def rootfs_tar(rootfs: Path, tar_path: Path) -> None:
    """The root filesystem as a tar, without device nodes (the runtime provides /dev)."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.ischr() or info.isblk() or info.isfifo():
            return None
        return info

    with tarfile.open(tar_path, "w") as tar:
        for child in sorted(rootfs.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)


def build_base(archive: Path, check: bool) -> None:
    require_tools("debootstrap", "buildah")
    with tempfile.TemporaryDirectory(prefix="kiosk-base-", dir=archives_dir()) as tmp_s:
        tmp = Path(tmp_s)
        rootfs = tmp / "rootfs"
        mirror, release = build_base_rootfs(rootfs, archives_dir() / "logs" / "base-debootstrap.log")
        packages = dpkg_versions(rootfs)
        python = os.readlink(rootfs / "usr/bin/python3")
        progress(f"base: {len(packages)} packages, python3 -> {python} {packages.get('python3', '?')}")
        text = render_lock(mirror, release, packages)
        (archive.with_suffix(".lock")).write_text(text)
        rootfs_tar(rootfs, tmp / "rootfs.tar")
        shutil.rmtree(rootfs)
        ctr = buildah("from", "--pull-never", "scratch")
        try:
            buildah("add", ctr, str(tmp / "rootfs.tar"), "/")
            config = ["--cmd", json.dumps(BASE_RECIPE["cmd"]),
                      "--label", "org.opencontainers.image.description=stand-in for python:3.11-slim-bookworm"
                      " built by kiosk-operator's tests/harness/images.py (debootstrap minbase + python3)"]
            for key, value in BASE_RECIPE["env"].items():
                config += ["--env", f"{key}={value}"]
            buildah("config", *config, ctr)
            buildah("commit", "--rm", ctr, BASE_REF)
        except BaseException:
            subprocess.run(buildah_argv("rm", ctr), capture_output=True)
            raise
        export(BASE_REF, archive)
    check_lock(text, check)


# --------------------------------------------------------------------------- Dockerfile images


def pip_config_files() -> list[Path]:
    """The host's global and user pip configuration files that exist (pip config debug)."""
    found = []
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "debug"], capture_output=True, text=True)
    section = ""
    for line in proc.stdout.splitlines():
        if re.match(r"^\S.*:$", line):
            section = line[:-1]
        m = re.match(r"^\s+(/\S+), exists: True$", line)
        if m and section in ("global", "user"):
            found.append(Path(m.group(1)))
    for fallback in (Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf")):
        if fallback.is_file() and fallback not in found:
            found.append(fallback)
    return found


def only_trusts_the_bundle(config: Path) -> bool:
    """Whether a pip config file sets nothing but ``cert`` = the CA bundle we mount anyway."""
    parser = configparser.ConfigParser()
    try:
        parser.read(config)
    except configparser.Error:
        return False
    settings = [(key, value) for section in parser.sections() for key, value in parser.items(section)]
    return all(key == "cert" and Path(value).resolve() == CA_BUNDLE.resolve() for key, value in settings)


def host_mounts() -> list[str]:
    """-v options: the host's CA bundle and pip config, read-only at the same paths.

    Bind mounts are not committed, but buildah 1.28 leaves an empty file where a mount target
    was missing (the images have no pip.conf). So a pip config that only points pip at the CA
    bundle is not mounted: pip in the build trusts the mounted bundle without it (the venv's
    first pip is Debian's, which uses the system bundle; pip 26.3 uses the system store).
    """
    mounts = []
    configs = [c for c in pip_config_files() if not only_trusts_the_bundle(c)]
    for path in [CA_BUNDLE, *configs]:
        if path.is_file():
            mounts += ["-v", f"{path.resolve()}:{path}:ro"]
    return mounts


def forget_layers_built_with_other_mounts(mounts: list[str]) -> None:
    """Drop the --layers cache when the mount set changed: buildah reuses a RUN layer whatever
    was mounted, and a layer may hold a mount point left behind (see host_mounts)."""
    stamp = storage_dir() / "mounts.json"
    wanted = json.dumps(mounts)
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if stamp.exists():
        progress("build mounts changed: dropping buildah's layer cache")
        subprocess.run(buildah_argv("rmi", "--all", "--force"), capture_output=True)
    storage_dir().mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)


def build_dockerfile(name: str, archive: Path, build_args: dict[str, str]) -> None:
    require_tools("buildah", "runc")
    dockerfile, ref = DOCKERFILES[name]
    forget_layers_built_with_other_mounts(host_mounts())
    restore(BASE_REF, archive_path("base", base_key()))
    # docker format: the OCI one drops SHELL (the Dockerfiles use bash's pipefail).
    argv = buildah_argv("bud", "--layers", "--pull=never", "--network=host", "--format=docker", *runtime(),
                        "-f", str(REPO_ROOT / dockerfile), "-t", ref, *host_mounts())
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    argv.append(str(REPO_ROOT))
    progress(f"{name}: buildah bud {dockerfile} -> {ref}")
    run_logged(argv, archives_dir() / "logs" / f"{name}.log", name, step_prefix=("STEP",))
    # The untagged intermediate images are the --layers cache of the next build: kept.
    export(ref, archive)


def export(ref: str, archive: Path) -> None:
    """Write ref to a docker-archive (atomically: a crash leaves no half archive under the key)."""
    partial = archive.with_name(f".{archive.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        buildah("push", ref, f"docker-archive:{partial}:{ref}")
        partial.replace(archive)
    finally:
        partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------- API


def archive_path(name: str, key: str) -> Path:
    return archives_dir() / f"{name}-{key}.tar"


def drop_stale(name: str, keep: Path) -> None:
    """Remove other archives of this image (earlier keys): the cache holds one per image."""
    for old in archives_dir().glob(f"{name}-*.tar"):
        if old != keep:
            old.unlink(missing_ok=True)
            old.with_suffix(".lock").unlink(missing_ok=True)


def restore(ref: str, archive: Path) -> None:
    """Put an archived image back into our buildah storage (it may have been wiped)."""
    if not has_image(ref):
        progress(f"loading {archive.name} into buildah storage")
        buildah("pull", "--quiet", f"docker-archive:{archive}")


def lock_check_mode(check: bool | None) -> bool:
    return check if check is not None else os.environ.get("KIOSK_IMAGES_LOCK") == "check"


def ensure_image(name: str, build_args: dict[str, str] | None = None, check: bool | None = None) -> BuiltImage:
    """The image ``name`` (base, worker, operator): cached archive if its inputs are unchanged, else built."""
    if name not in NAMES:
        raise ValueError(f"unknown image {name!r}; known: {', '.join(NAMES)}")
    check = lock_check_mode(check)
    with build_lock():
        base_archive = archive_path("base", base_key())
        base_built = False
        if not base_archive.exists():
            started = time.monotonic()
            build_base(base_archive, check)
            drop_stale("base", base_archive)
            base_built = True
            progress(f"base: built in {time.monotonic() - started:.0f} s ({base_archive.stat().st_size >> 20} MiB)")
        else:
            restore(BASE_REF, base_archive)
            recorded = base_archive.with_suffix(".lock")
            if recorded.exists() and check and recorded.read_text() != (IMAGES_LOCK.read_text()
                                                                         if IMAGES_LOCK.exists() else ""):
                raise ImageBuildError(f"cached base {base_archive.name} differs from tools/images/images.lock")
        if name == "base":
            return BuiltImage("base", BASE_REF, base_archive, base_key(), base_built)

        args = dict(build_args or {})
        key = dockerfile_key(name, args)
        ref = DOCKERFILES[name][1]
        archive = archive_path(name, key)
        if archive.exists():
            progress(f"{name}: cached {archive.name}")
            return BuiltImage(name, ref, archive, key, False)
        started = time.monotonic()
        build_dockerfile(name, archive, args)
        drop_stale(name, archive)
        progress(f"{name}: built in {time.monotonic() - started:.0f} s ({archive.stat().st_size >> 20} MiB)")
        return BuiltImage(name, ref, archive, key, True)


def ensure_images(names: Iterable[str] = ("worker", "operator"), check: bool | None = None) -> dict[str, BuiltImage]:
    """ensure_image for each name, in order; the base is built once for all."""
    return {name: ensure_image(name, check=check) for name in names}


def in_storage(image: BuiltImage) -> str:
    """The image's reference, loaded into our buildah storage from its archive if needed."""
    with build_lock():
        restore(image.ref, image.archive)
    return image.ref


def inspect(image: BuiltImage) -> dict:
    """buildah's view of the image (OCIv1 config: User, Entrypoint, Env ...)."""
    return json.loads(buildah("inspect", "--type", "image", in_storage(image)))


def run_in(image: BuiltImage, argv: Sequence[str], user: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run argv in a throwaway container of the image (buildah run, no network); its result."""
    ctr = buildah("from", "--pull-never", in_storage(image))
    try:
        extra = [f"--user={user}"] if user else []
        return subprocess.run(buildah_argv("run", "--network=none", *runtime(), *extra, ctr, "--", *argv),
                              capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run(buildah_argv("rm", ctr), capture_output=True)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.images", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find cached) images; prints name, reference, archive")
    build.add_argument("names", nargs="*", metavar="NAME",
                       help=f"any of {', '.join(NAMES)} (default: worker operator)")
    build.add_argument("--check", action="store_true", default=None,
                       help="fail if the base differs from tools/images/images.lock instead of updating it")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NAMES))
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}; known: {', '.join(NAMES)}")
    args.names = args.names or ["worker", "operator"]
    started = time.monotonic()
    try:
        built = ensure_images(args.names, check=args.check)
    except ImageBuildError as exc:
        print(f"images: error: {exc}", file=sys.stderr)
        return 1
    for image in built.values():
        print(f"{image.name}\t{image.ref}\t{image.archive}")
    progress(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
