"""The hash chain over ``audit_log``: the canonical form of an entry and its hash.

An entry's canonical form is the JSON object of every stored column except ``entry_hash`` and
``request_body`` (which ``request_body_sha256`` stands for), with keys sorted, no whitespace, non-ASCII
characters kept as UTF-8, and SQL NULL as ``null`` -- except the columns added after the first release
(:data:`LATER`), which appear only when not NULL, so that every entry written before them keeps its
hash. An entry with a ``content_commitment`` (written since migration ``m014``) leaves its content
columns (:data:`topic_audit.log.content.CONTENT`) out: the commitment stands for them, so that erasing them
keeps the entry verifiable (:mod:`topic_audit.log.content`). ``entry_hash`` is the lowercase hex SHA-256 of
those bytes; ``prev_hash`` is the previous entry's ``entry_hash`` (64 zeros for the first entry), so every entry
commits to the whole log before it. docs/log-format.md ("Canonical form and re-verification") shows a short script that re-verifies a log this way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Final

import msgspec

from topic_audit.log.content import CONTENT

GENESIS: Final = "0" * 64

# Every column of audit_log, in table order. Migrations that add a column add it here too.
COLUMNS: Final = (
    "id",
    "received_at",
    "method",
    "path",
    "query_string",
    "sdk_app_id",
    "callback_command",
    "client_ip",
    "opt_platform",
    "request_time",
    "remote_addr",
    "request_headers",
    "request_body",
    "request_body_sha256",
    "request_body_bytes",
    "status_code",
    "response_body",
    "outcome",
    "reason",
    "detail",
    "topic_id",
    "group_id",
    "duplicate_of",
    "elapsed_ms",
    "prev_hash",
    "entry_hash",
    "client_cert_subject",
    "content_commitment",
)
LATER: Final = ("client_cert_subject", "content_commitment")
"""Columns added after the first release: in the canonical form only when not NULL."""
HASHED: Final = tuple(c for c in COLUMNS if c not in ("entry_hash", "request_body"))


SORTED: Final = tuple(sorted(HASHED))
"""The hashed columns in the order the canonical form lists them."""

# A struct encodes its fields in declaration order: declared in key order, it is the canonical object
# without sorting keys per entry (half the cost of encoding a dict with ``order="sorted"``).
_CERT, _COMMITMENT = SORTED.index("client_cert_subject"), SORTED.index("content_commitment")
_Old = msgspec.defstruct("_Old", [(name, object) for name in SORTED if name not in LATER])
_OldWithCert = msgspec.defstruct("_OldWithCert", [(n, object) for n in SORTED if n != "content_commitment"])
_COMMITTED = tuple(i for i, name in enumerate(SORTED) if name not in CONTENT)
_NO_CERT = tuple(i for i in _COMMITTED if i != _CERT)
_Committed = msgspec.defstruct("_Committed", [(SORTED[i], object) for i in _COMMITTED])
_CommittedNoCert = msgspec.defstruct("_CommittedNoCert", [(SORTED[i], object) for i in _NO_CERT])
_encoder = msgspec.json.Encoder()


def canonical(entry: Mapping[str, object]) -> bytes:
    """The bytes that ``entry_hash`` is the SHA-256 of (msgspec: same bytes as :func:`canonical_json`).

    The two agree on every value a row holds: text, 64-bit integers, NULL, and ``elapsed_ms``, which is
    rounded to 3 decimals and kept below 1e9 (where Python and msgspec print floats alike).
    ``tests/test_chain.py`` checks the agreement.
    """
    return canonical_values([entry.get(name) if name in LATER else entry[name] for name in SORTED])


def canonical_values(values: Sequence[object]) -> bytes:
    """:func:`canonical` of an entry given as its values in :data:`SORTED` order (as a query returns them)."""
    if values[_COMMITMENT] is not None:
        if values[_CERT] is None:
            return _encoder.encode(_CommittedNoCert(*[values[i] for i in _NO_CERT]))
        return _encoder.encode(_Committed(*[values[i] for i in _COMMITTED]))
    if values[_CERT] is None:
        return _encoder.encode(
            _Old(*values[:_CERT], *values[_CERT + 1 : _COMMITMENT], *values[_COMMITMENT + 1 :])
        )
    return _encoder.encode(_OldWithCert(*values[:_COMMITMENT], *values[_COMMITMENT + 1 :]))


def canonical_json(entry: Mapping[str, object]) -> bytes:
    """The reference definition, with the standard library, as the script in docs/log-format.md computes it."""
    committed = entry.get("content_commitment") is not None
    return json.dumps(
        {
            name: entry[name]
            for name in HASHED
            if (name not in LATER or entry[name] is not None) and not (committed and name in CONTENT)
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()


def entry_hash(entry: Mapping[str, object]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def body_bytes(stored: object) -> bytes:
    """The exact request bytes from a stored ``request_body`` (TEXT when valid UTF-8, else BLOB)."""
    if stored is None:
        return b""
    if isinstance(stored, str):
        return stored.encode("utf-8", "surrogatepass")
    if isinstance(stored, bytes | bytearray | memoryview):
        return bytes(stored)
    raise TypeError(f"unexpected request_body type {type(stored).__name__}")


def stored_body(raw: bytes) -> str | bytes:
    """How a request body is stored: TEXT when it is valid UTF-8 (readable in Datasette), else BLOB."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
