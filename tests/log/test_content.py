"""Keyed commitments: what an entry's hash covers once it has one, and what the commitment reveals."""

from __future__ import annotations

import hashlib
import hmac
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from topic_audit.log import chain, content

values = st.one_of(st.none(), st.text())
bodies = st.one_of(st.none(), st.text(), st.binary())
entries = st.fixed_dictionaries(
    {name: (bodies if name == "request_body" else values) for name in content.CONTENT}
)


def reference(salt: bytes, entry: dict[str, object]) -> str:
    """The commitment as the README defines it, with the standard library."""
    body = entry["request_body"]
    raw = body.encode() if isinstance(body, str) else body
    shown = {**entry, "request_body": raw.hex() if isinstance(raw, bytes) else None}
    text = json.dumps(shown, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hmac.new(salt, text, hashlib.sha256).hexdigest()


@settings(max_examples=500)
@given(entries, st.binary(min_size=32, max_size=32))
def test_commitment_equals_the_reference(entry: dict[str, object], salt: bytes) -> None:
    assert content.commitment(salt, entry) == reference(salt, entry)


def row(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = dict.fromkeys(chain.COLUMNS, "x")
    entry.update(changes)
    return entry


def test_a_committed_entry_hashes_its_commitment_not_its_content() -> None:
    entry = row(content_commitment="c" * 64)
    before = chain.entry_hash(entry)
    for name in content.CONTENT:
        changed = {**entry, name: "changed"}
        assert chain.entry_hash(changed) == before, name  # the commitment stands for it
    assert chain.entry_hash({**entry, "content_commitment": "d" * 64}) != before
    assert chain.entry_hash({**entry, "outcome": "rejected"}) != before  # evidence is hashed
    blanked = {**entry, **content.ERASED}
    assert chain.entry_hash(blanked) == before  # erasing keeps the entry verifiable
    assert chain.canonical(entry) == chain.canonical_json(entry)


def test_an_entry_without_a_commitment_hashes_its_content() -> None:
    entry = row(content_commitment=None)
    assert chain.entry_hash({**entry, "detail": "changed"}) != chain.entry_hash(entry)


def test_the_commitment_depends_on_every_content_column_and_on_the_salt() -> None:
    entry: dict[str, object] = dict.fromkeys(content.CONTENT, "x")
    salt = content.new_salt()
    base = content.commitment(salt, entry)
    for name in content.CONTENT:
        assert content.commitment(salt, {**entry, name: "y"}) != base, name
    assert content.commitment(content.new_salt(), entry) != base
    assert len(content.new_salt()) == 32 and content.new_salt() != content.new_salt()


def test_erased_values() -> None:
    assert content.is_erased(dict(content.ERASED))
    assert not content.is_erased({**content.ERASED, "detail": "x"})
