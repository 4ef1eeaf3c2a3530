"""Zip jobs, pure parts: safe extraction limits, member names, child bookkeeping."""

from __future__ import annotations

import io
import stat
import struct
import urllib.parse
import zipfile
from pathlib import Path

import pytest

import kiosk_protocol as protocol
from kiosk_protocol import zipjobs
from kiosk_worker import ziparchive
from kiosk_worker.errors import JobError, reason_for
from kiosk_worker.ziparchive import ZipLimits, ZipRejected

LIMITS = ZipLimits(max_members=10, max_bytes=1 << 20)


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def patch_declared_size(path: Path, size: int) -> None:
    """Rewrite every central-directory entry's uncompressed size (a lying header)."""
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        struct.pack_into("<I", data, pos + 24, size)
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))


# --- names ---


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.tif", "a.tif"),
        ("dir/sub/b.png", "dir/sub/b.png"),
        ("./dir//c.tif", "dir/c.tif"),
        ("dir\\d.tif", "dir/d.tif"),
        ("x:y.png", "x:y.png"),  # a colon is part of a POSIX name, not a drive
        ("C:x.png", "C:x.png"),
        ("dir/b:c.tif", "dir/b:c.tif"),
        ("dir/", None),
        (".hidden.tif", None),
        ("dir/.DS_Store", None),
        (".git/x.tif", None),
        ("__MACOSX/._a.tif", None),
    ],
)
def test_member_target_keeps_or_skips(name: str, expected: str | None) -> None:
    assert ziparchive.member_target(name) == expected


@pytest.mark.parametrize("name", ["../evil.tif", "a/../../evil.tif", "/etc/passwd", "C:/x.tif", "..\\x.tif",
                                  "C:/x.png", "/x.png", "c:\\x.png", "C:", "//server/share/x.png",
                                  "x/../../y.png"])
def test_member_target_rejects_escapes(name: str) -> None:
    with pytest.raises(ZipRejected) as err:
        ziparchive.member_target(name)
    assert "\n" not in str(err.value)


def test_child_queue_and_key() -> None:
    assert zipjobs.child_queue_of("segmentation-zip") == "segmentation"
    assert zipjobs.child_queue_of("predict") == "predict"
    parent = "segmentation-zip:batch.zip:1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    key = zipjobs.child_key("segmentation", "dir/a.tif", parent, "ab" * 16)
    assert key == f"segmentation:dir/a.tif:1b4e28ba-2fa1-11d2-883f-0016d3cca427.{'ab' * 16}"
    assert protocol.queue_of_key(zipjobs.child_key("segmentation", "a.tif", parent)) == "segmentation"
    assert zipjobs.child_key("segmentation", "a.tif", parent) != zipjobs.child_key("segmentation", "a.tif", parent)


def test_child_keys_name_their_parent() -> None:
    """A key in a parent's ``children`` that the parent did not make is refused: another job's
    key, a sibling parent's child, a child on another queue, or a forged list entry."""
    parent = "segmentation-zip:batch.zip:p1"
    own = [zipjobs.child_key("segmentation", m, parent) for m in ("a.tif", "x:y.png", "d/b.tif")]
    other_parent = zipjobs.child_key("segmentation", "a.tif", "segmentation-zip:other.zip:p2")
    victim = protocol.job_key("segmentation", "secret.tif")
    forged = [
        victim,
        other_parent,
        zipjobs.child_key("tracking", "a.tif", parent),
        f"segmentation:a.tif:p1.{'z' * 32}",
        f"segmentation:a.tif:p1.{'a' * 31}",
        "segmentation:a.tif:p1",
        f"segmentation:a.tif:xp1.{'a' * 32}",
        f"segmentation:{victim},x:p1.{'a' * 32}",
    ]
    assert zipjobs.foreign_children(parent, "segmentation", own) == []
    assert zipjobs.foreign_children(parent, "segmentation", own + forged) == forged
    # The parent's own key, joined and split again, round-trips in the Kiosk's wire format.
    assert zipjobs.split_keys(zipjobs.join_keys(own)) == own


def test_member_names_with_the_key_separator_are_refused(tmp_path: Path) -> None:
    """``a,<victim key>,z.tif`` would add the victim to the parent's comma-joined children."""
    victim = protocol.job_key("segmentation", "secret.tif")
    archive = make_zip(tmp_path / "inject.zip", {"ok.tif": b"x", f"a,{victim},z.tif": b"y"})
    with pytest.raises(ZipRejected) as err:
        ziparchive.extract_archive(archive, tmp_path / "out", LIMITS)
    reason = reason_for(err.value)
    assert f"'a,{victim},z.tif'" in reason and "','" in reason and "\n" not in reason
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert zipjobs.separator_in("a,b.tif") and not zipjobs.separator_in("a;b.tif")


def test_failures_are_urlencoded_like_the_kiosk() -> None:
    failures = {"seg:a.tif:1": "image is corrupt: bad & wrong", "seg:b b.tif:2": "x=y"}
    text = zipjobs.encode_failures(failures)
    assert text == urllib.parse.urlencode(failures)
    assert zipjobs.decode_failures(text) == failures
    assert zipjobs.encode_failures({}) == ""
    assert zipjobs.decode_failures("") == {}


def test_split_and_join_keys() -> None:
    assert zipjobs.split_keys("a,b,,a, c") == ["a", "b", "c"]
    assert zipjobs.split_keys(None) == []
    assert zipjobs.join_keys(["a", "", "b"]) == "a,b"


@pytest.mark.parametrize(("finished", "total", "pct"),
                         [(0, 4, 0), (1, 4, 25), (1, 3, 33), (4, 4, 100), (0, 0, 100)])
def test_progress_percent(finished: int, total: int, pct: int) -> None:
    assert zipjobs.progress_percent(finished, total) == pct


def test_child_fields_copy_parent_without_its_progress() -> None:
    parent = protocol.submission_fields("uploads/batch.zip", "segmentation", "1")
    parent.update({"status": "waiting", "children": "x,y", "children:done": "x", "progress": "50",
                   "identity_started": "w0", "reason": "r", "output_url": "u",
                   "notes": "n" * 4096, "internal:cache": "c" * 4096})
    del parent["cuts"]
    child = zipjobs.child_fields(parent, "uploads/abc/a.tif", "a.tif", "worker-1")
    # Only the Kiosk submission fields: nothing else a form (or a parent) carries is fanned out.
    assert set(child) == set(protocol.SUBMISSION_FIELDS)
    assert child["cuts"] == ""
    assert child["status"] == protocol.NEW
    assert child["input_file_name"] == "uploads/abc/a.tif"
    assert child["original_name"] == "a.tif"
    assert child["model_name"] == "segmentation" and child["model_version"] == "1"
    assert child["identity_upload"] == "worker-1"
    for dropped in ("children", "children:done", "progress", "identity_started", "reason", "output_url"):
        assert dropped not in child
    assert set(protocol.SUBMISSION_FIELDS) <= set(child)


def test_tally_children() -> None:
    children = ["a", "b", "c", "d", "e"]
    tally = zipjobs.tally_children(children, done=["a"], failed=[],
                                   statuses={"b": "done", "c": "failed", "d": "predicting", "e": None})
    assert tally.done == ("a", "b")
    assert tally.failed == ("c", "e")
    assert tally.remaining == ("d",)
    assert tally.progress == 80 and not tally.complete
    final = zipjobs.tally_children(children, tally.done, tally.failed, {"d": "done"})
    assert final.complete and final.progress == 100 and final.done == ("a", "b", "d")


# --- plan / extract ---


def test_extract_skips_dirs_hidden_and_macosx(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "in.zip", {
        "a.tif": b"A" * 10, "sub/b.png": b"B" * 20, "sub/": b"", ".hidden": b"h",
        "__MACOSX/._a.tif": b"m", "sub/.DS_Store": b"d",
    })
    out = tmp_path / "out"
    got = ziparchive.extract_archive(archive, out, LIMITS)
    assert sorted(got) == ["a.tif", "sub/b.png"]
    assert (out / "a.tif").read_bytes() == b"A" * 10
    assert (out / "sub" / "b.png").read_bytes() == b"B" * 20
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.tif", "b.png"]


def test_colon_names_are_extracted_as_relative_files(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "colon.zip", {"x:y.png": b"1", "sub/C:x.png": b"2"})
    out = tmp_path / "out"
    assert sorted(ziparchive.extract_archive(archive, out, LIMITS)) == ["sub/C:x.png", "x:y.png"]
    assert (out / "x:y.png").read_bytes() == b"1" and (out / "sub" / "C:x.png").read_bytes() == b"2"


def test_too_many_members_rejected_before_extracting(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "many.zip", {f"{i}.tif": b"x" for i in range(11)})
    out = tmp_path / "out"
    with pytest.raises(ZipRejected, match="more than 10 files"):
        ziparchive.extract_archive(archive, out, LIMITS)
    assert not out.exists() or not any(out.iterdir())


def test_bomb_rejected_from_declared_sizes(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.tif": bytes(4 << 20)})
    assert archive.stat().st_size < 64 << 10  # highly compressed
    out = tmp_path / "out"
    with pytest.raises(ZipRejected, match="MAX_ZIP_BYTES") as err:
        ziparchive.extract_archive(archive, out, LIMITS)
    assert "1 MiB" in str(err.value)
    assert not out.exists() or not any(out.iterdir())


def test_huge_declared_size_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "liar.zip", {"a.tif": b"small"})
    patch_declared_size(archive, 0xFFFF0000)
    with pytest.raises(ZipRejected, match="MAX_ZIP_BYTES"):
        ziparchive.extract_archive(archive, tmp_path / "out", LIMITS)


def test_header_smaller_than_content_is_caught_while_extracting(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "liar.zip", {"a.tif": bytes(200_000)})
    patch_declared_size(archive, 100)
    with pytest.raises(ZipRejected) as err:
        ziparchive.extract_archive(archive, tmp_path / "out", LIMITS)
    assert "a.tif" in str(err.value)
    assert (tmp_path / "out" / "a.tif").stat().st_size <= 100


def test_total_counted_while_extracting(tmp_path: Path) -> None:
    """Many members whose sum passes the limit: caught from the headers, then by counting."""
    archive = make_zip(tmp_path / "sum.zip", {f"{i}.tif": bytes(300_000) for i in range(4)})
    with pytest.raises(ZipRejected, match="MAX_ZIP_BYTES"):
        ziparchive.extract_archive(archive, tmp_path / "out", LIMITS)
    infos = zipfile.ZipFile(archive).infolist()
    for info in infos:
        info.file_size = 1  # a forged directory passes the plan ...
    assert len(ziparchive.plan_members(infos, LIMITS)) == 4


@pytest.mark.parametrize("name", ["../escape.tif", "/abs.tif", "ok/../../escape.tif"])
def test_traversal_rejected(tmp_path: Path, name: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("good.tif", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    archive = tmp_path / "t.zip"
    archive.write_bytes(buf.getvalue())
    out = tmp_path / "deep" / "out"
    with pytest.raises(ZipRejected, match="outside|absolute"):
        ziparchive.extract_archive(archive, out, LIMITS)
    assert not (tmp_path / "deep" / "escape.tif").exists()
    assert not (tmp_path / "escape.tif").exists()


def test_symlink_rejected(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link.tif")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ZipRejected, match="symbolic link"):
        ziparchive.extract_archive(archive, tmp_path / "out", LIMITS)


def test_not_a_zip_and_empty_zip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(ZipRejected, match="not a valid zip"):
        ziparchive.extract_archive(bad, tmp_path / "o1", LIMITS)
    empty = make_zip(tmp_path / "empty.zip", {"dir/": b"", "__MACOSX/x": b"y"})
    with pytest.raises(ZipRejected, match="no files"):
        ziparchive.extract_archive(empty, tmp_path / "o2", LIMITS)


def test_duplicate_member_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "dup.zip", {"a.tif": b"1", "./a.tif": b"2"})
    with pytest.raises(ZipRejected, match="more than once"):
        ziparchive.extract_archive(archive, tmp_path / "out", LIMITS)


def test_file_and_folder_with_one_name_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "clash.zip", {"a": b"file", "a/b/c.tif": b"x"})
    with pytest.raises(ZipRejected, match="both a file and a folder"):
        ziparchive.extract_archive(archive, tmp_path / "out", LIMITS)


def test_rejection_is_a_one_line_job_reason(tmp_path: Path) -> None:
    err = ZipRejected("zip entry '../x' points outside the archive directory")
    assert isinstance(err, JobError)
    assert reason_for(err) == "zip entry '../x' points outside the archive directory"


def test_pack_results_unpacks_child_zips_into_folders(tmp_path: Path) -> None:
    r1 = make_zip(tmp_path / "r1.zip", {"a_feature_0.tif": b"1"})
    r2 = make_zip(tmp_path / "r2.zip", {"b_feature_0.tif": b"2", "../evil": b"x"})
    plain = tmp_path / "c.tif"
    plain.write_bytes(b"3")
    out = tmp_path / "all.zip"
    n = ziparchive.pack_results([("a.tif", r1), ("sub/b.png", r2), ("c.npy", plain)], out)
    with pytest.raises(ZipRejected):
        ziparchive.member_target("../evil")
    assert n == 3
    names = sorted(zipfile.ZipFile(out).namelist())
    assert names == ["a/a_feature_0.tif", "c/c.tif", "sub/b/b_feature_0.tif"]
