"""The canonical form: the fast encoder and the README's standard-library definition agree byte for byte."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from topic_audit.log import chain
from topic_audit.receiver.app import MAX_ELAPSED_MS

values = st.one_of(
    st.none(),
    st.text(),
    st.integers(-(2**63), 2**63 - 1),
)
rows = st.fixed_dictionaries(
    {
        name: (
            st.floats(min_value=0, max_value=MAX_ELAPSED_MS).map(lambda x: round(x, 3))
            if name == "elapsed_ms"
            else values
        )
        for name in chain.COLUMNS
    }
)


@settings(max_examples=500)
@given(rows)
def test_fast_canonical_form_equals_the_reference(row: dict[str, object]) -> None:
    assert chain.canonical(row) == chain.canonical_json(row)


def test_request_body_and_entry_hash_are_not_hashed() -> None:
    row: dict[str, object] = dict.fromkeys(chain.COLUMNS, "x")
    row["content_commitment"] = None  # an entry written before keyed commitments (tests/log/test_content.py)
    before = chain.entry_hash(row)
    row["request_body"], row["entry_hash"] = "changed", "changed"
    assert chain.entry_hash(row) == before
    row["request_body_sha256"] = "changed"
    assert chain.entry_hash(row) != before


def test_body_bytes_round_trip() -> None:
    for raw in (b"", b"{}", "话题".encode(), b"\xff\x00\xfe", b"a\x00b"):
        assert chain.body_bytes(chain.stored_body(raw)) == raw


@settings(max_examples=2000)
@given(st.floats(min_value=0, max_value=4e9))
def test_received_at_matches_datetime(now: float) -> None:
    from datetime import UTC, datetime

    from topic_audit import clock

    assert clock.iso(now) == datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@settings(max_examples=2000)
@given(st.text(alphabet="ab=&%2B+x;", max_size=40))
def test_fast_query_parsing_matches_the_standard_library(query: str) -> None:
    from urllib.parse import parse_qsl

    from topic_audit.tencent.checks import parse_query

    expected: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        expected.setdefault(name, value)
    assert parse_query(query) == expected


def test_a_later_column_left_null_keeps_the_hash_of_entries_written_before_it() -> None:
    """Entries written before ``client_cert_subject`` existed hash as they did then."""
    row: dict[str, object] = dict.fromkeys(chain.COLUMNS, "x")
    row["client_cert_subject"] = row["content_commitment"] = None
    before_the_column = {k: v for k, v in row.items() if k not in chain.LATER}
    expected = hashlib.sha256(
        json.dumps(
            {k: v for k, v in before_the_column.items() if k not in ("entry_hash", "request_body")},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).hexdigest()
    assert chain.entry_hash(row) == expected
    row["client_cert_subject"] = "CN=tencent"
    assert chain.entry_hash(row) != expected
    assert chain.canonical(row) == chain.canonical_json(row)
