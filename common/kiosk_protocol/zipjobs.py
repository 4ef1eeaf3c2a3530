"""Zip parent and child jobs on the wire: how the zip consumer fans an archive out.

The parent hash carries ``children`` (comma-joined child keys, as Kiosk clients read it),
``children:done``, ``children:failed``, ``progress`` and at the end ``failures`` (urlencoded
``{child: reason}``). Children copy the parent's submission fields (``SUBMISSION_FIELDS``
only) under ``{child_queue}:{member_path}:{parent_id}.{uuid}``: the id part names the parent
(``parent_id``: the last part of its key), so a key in ``children`` that is not one of the
parent's own (``foreign_children``) is refused instead of being watched, collected into the
parent's zip and expired. Member paths never contain KEY_SEPARATOR (``separator_in``). Pure.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from kiosk_protocol.fields import DONE, FAILED, NEW, SUBMISSION_FIELDS
from kiosk_protocol.keys import ZIP_SUFFIX, job_key, utc_now_iso

KEY_SEPARATOR = ","
_NONCE = re.compile(r"[0-9a-f]{32}")


# --- names ------------------------------------------------------------------------------------


def child_queue_of(queue: str) -> str:
    """Children go to the sibling queue: ``segmentation-zip`` -> ``segmentation``."""
    if queue.endswith(ZIP_SUFFIX) and len(queue) > len(ZIP_SUFFIX):
        return queue[: -len(ZIP_SUFFIX)]
    return queue


def parent_id(parent_key: str) -> str:
    """The id part of a job key ``{queue}:{image}:{id}`` (the whole key if it has no ':')."""
    return parent_key.rsplit(":", 1)[-1]


def child_key(child_queue: str, member_path: str, parent_key: str, nonce: str | None = None) -> str:
    """``{child_queue}:{member_path}:{parent_id}.{uuid hex}``: the Kiosk's child key, whose id
    part also names its parent."""
    return job_key(child_queue, member_path, f"{parent_id(parent_key)}.{nonce or uuid.uuid4().hex}")


def is_child_of(key: str, parent_key: str, child_queue: str) -> bool:
    """True if ``key`` is one of the keys ``child_key`` makes for this parent and child queue."""
    if KEY_SEPARATOR in key or not key.startswith(child_queue + ":"):
        return False
    owner, dot, nonce = key.rsplit(":", 1)[-1].rpartition(".")
    return bool(dot) and owner == parent_id(parent_key) and _NONCE.fullmatch(nonce) is not None


def foreign_children(parent_key: str, child_queue: str, keys: Iterable[str]) -> list[str]:
    """The keys in a parent's ``children`` that are not its own children (should be none)."""
    return [k for k in keys if not is_child_of(k, parent_key, child_queue)]


#: The id part of the child keys the previous release wrote: ``{child_queue}:{member}:{uuid4}``.
_LEGACY_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def legacy_child_member(key: str, child_queue: str) -> str | None:
    """The member path of a child key in the previous release's form
    (``{child_queue}:{member_path}:{uuid4}``, no parent id), else None."""
    if KEY_SEPARATOR in key or not key.startswith(child_queue + ":"):
        return None
    member, _, ident = key[len(child_queue) + 1:].rpartition(":")
    return member if member and _LEGACY_ID.fullmatch(ident) else None


def is_legacy_child(key: str, child_queue: str, parent: Mapping[str, str],
                    child: Mapping[str, str]) -> bool:
    """Whether ``key`` in a parent's ``children`` is a child the previous release fanned out
    for it, so that a zip parent written before an upgrade still finishes.

    Such keys do not name their parent; a key is accepted when it has that form and its hash
    (``child``, empty if gone) is a child's: ``original_name`` is the key's member path and it
    was created no earlier than the parent. Another job's key can only get into ``children``
    (forged, or injected through a member name) if it existed when the parent was submitted,
    so it is older than the parent and refused. A key whose hash is gone holds nothing to
    leak; it is accepted and reported lost."""
    member = legacy_child_member(key, child_queue)
    if member is None:
        return False
    if not child:
        return True
    if child.get("original_name") != member:
        return False
    try:
        return _instant(child.get("created_at", "")) >= _instant(parent.get("created_at", ""))
    except ValueError:
        return False


def _instant(text: str) -> datetime:
    stamp = datetime.fromisoformat(text.strip())
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def separator_in(member_path: str) -> bool:
    """A member path containing KEY_SEPARATOR would split its child key in ``children``."""
    return KEY_SEPARATOR in member_path


def split_keys(text: str | None) -> list[str]:
    """Comma-joined key list -> keys, dropping blanks (order kept, duplicates removed)."""
    seen: dict[str, None] = {}
    for part in (text or "").split(KEY_SEPARATOR):
        part = part.strip()
        if part:
            seen.setdefault(part, None)
    return list(seen)


def join_keys(keys: Iterable[str]) -> str:
    return KEY_SEPARATOR.join(k for k in keys if k)


def encode_failures(failures: Mapping[str, str]) -> str:
    """``failures`` as the Kiosk writes it: ``urllib.parse.urlencode({child_key: reason})``."""
    return urllib.parse.urlencode(dict(failures))


def decode_failures(text: str | None) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(text or "", keep_blank_values=True))


def progress_percent(finished: int, total: int) -> int:
    """0-100; an empty archive is complete."""
    if total <= 0:
        return 100
    return min(100, max(0, round(100 * finished / total)))


def child_fields(parent: Mapping[str, str], input_file_name: str, member_path: str,
                 worker: str, now: str | None = None) -> dict[str, str]:
    """A child job hash: the parent's submission fields (SUBMISSION_FIELDS, nothing else) with
    its own input file and status new."""
    stamp = now or utc_now_iso()
    fields = {k: parent.get(k, "") for k in SUBMISSION_FIELDS}
    fields.update(
        input_file_name=input_file_name,
        original_name=member_path,
        status=NEW,
        identity_upload=worker,
        created_at=stamp,
        updated_at=stamp,
    )
    return fields


@dataclass(frozen=True)
class ChildTally:
    """Where the children of one parent stand after a check."""

    done: tuple[str, ...]
    failed: tuple[str, ...]
    remaining: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.done) + len(self.failed) + len(self.remaining)

    @property
    def progress(self) -> int:
        return progress_percent(len(self.done) + len(self.failed), self.total)

    @property
    def complete(self) -> bool:
        return not self.remaining


def tally_children(children: Iterable[str], done: Iterable[str], failed: Iterable[str],
                   statuses: Mapping[str, str | None]) -> ChildTally:
    """Fold freshly read child statuses into the parent's running lists.

    ``statuses`` holds the current status of the children still open; a child
    whose hash is gone (None) counts as failed, since its result is lost.
    """
    done_set, failed_set = set(done), set(failed)
    new_done, new_failed, remaining = [], [], []
    for key in children:
        if key in done_set:
            new_done.append(key)
        elif key in failed_set:
            new_failed.append(key)
        else:
            status = statuses.get(key, "")
            if status == DONE:
                new_done.append(key)
            elif status == FAILED or status is None:
                new_failed.append(key)
            else:
                remaining.append(key)
    return ChildTally(tuple(new_done), tuple(new_failed), tuple(remaining))
