"""The README documents every worker setting and every ConsumerPool field, and says `make test`."""

from __future__ import annotations

from pathlib import Path

import crd_reference

from kiosk_protocol.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_names_the_test_command() -> None:
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_worker_setting_is_documented() -> None:
    missing = [name for name in ENV_NAMES if f"| `{name}` |" not in README]
    assert not missing, f"README lacks worker settings: {missing}"


def test_consumerpool_reference_matches_the_crd() -> None:
    block = crd_reference.reference()
    assert block in README, "README's ConsumerPool reference is stale: run `python tools/crd_reference.py --write`"
