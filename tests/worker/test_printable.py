"""Hostile text in logs, reasons and the terminal: kiosk_protocol.errors.printable / one_line."""

from __future__ import annotations

import pytest

from kiosk_protocol import fields
from kiosk_protocol.errors import LOG_LIMIT, one_line, printable
from kiosk_protocol.settings import load_settings


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("segmentation:a.tif:1", "segmentation:a.tif:1"),
        ("a\nINFO forged line", "a\\nINFO forged line"),
        ("\r\t", "\\r\\t"),
        ("\x1b[2J\x1b]0;owned\x07", "\\x1b[2J\\x1b]0;owned\\x07"),
        ("abc\u202edef", "abc\\u202edef"),  # a bidi override would reverse what follows
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("naïve 図.tif", "naïve 図.tif"),
        (b"bytes\n", "bytes\\n"),
    ],
)
def test_printable_escapes_what_a_terminal_or_log_would_act_on(text: object, shown: str) -> None:
    assert printable(text) == shown


def test_printable_caps_the_length_without_cutting_an_escape() -> None:
    huge = "k" * (20 << 20)
    assert printable(huge) == "k" * (LOG_LIMIT - 3) + "..."
    assert len(printable(huge, 50)) == 50
    assert printable("\n" * 100, 10) == "\\n\\n\\n..."
    assert printable("abcd", 4) == "abcd" and printable("abcde", 4) == "a..."


def test_one_line_collapses_escapes_and_caps() -> None:
    assert one_line("bad\n  image\x1b[31m") == "bad image\\x1b[31m"
    assert len(one_line("word " * (5 << 20))) == 300
    assert one_line(" " * 10_000 + "end").endswith("...")


def test_max_field_bytes_setting_defaults_to_the_protocol_constant() -> None:
    assert load_settings({}).max_field_bytes == fields.MAX_FIELD_BYTES == 8192
    assert load_settings({"MAX_FIELD_BYTES": "65536"}).max_field_bytes == 65536
