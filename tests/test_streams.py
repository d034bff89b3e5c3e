"""shared/streams.py's small helpers that every event and task field goes through."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from shared.streams import decode_fields, now_iso, parse_iso


def test_now_iso_is_utc_with_milliseconds_and_z() -> None:
    before = datetime.now(UTC)
    stamp = now_iso()
    after = datetime.now(UTC)
    # The stamp keeps milliseconds only: it may read up to 1 ms before `before`.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    parsed = parse_iso(stamp)
    assert parsed is not None and before - timedelta(milliseconds=1) <= parsed <= after


def test_decode_fields_takes_text_bytes_and_numbers() -> None:
    assert decode_fields({"a": "x", b"b": b"y", "n": 3, b"bad": b"\xff"}) == {
        "a": "x",
        "b": "y",
        "n": "3",
        "bad": "\ufffd",
    }
