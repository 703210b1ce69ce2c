"""Content and evidence of a log entry, and the keyed commitment that lets content be forgotten.

*Content* is whatever can identify a person or says what they did: the request body (and the unsalted
SHA-256 that stands for it), the query string (it holds the end user's ``ClientIP``), ``client_ip``, the
request headers, our answer and the ``detail`` text. *Evidence* is the rest: ids, times, command,
outcome, reason, status, sizes, the group and topic ids, the chain links. Erasing an entry removes its
content and keeps its evidence (SPEC, "Retention and erasure").

Entries written since migration ``m014`` commit to their content through a keyed commitment: each entry
gets 32 random bytes (``content_keys.salt``, written in the same transaction as the entry) and
``content_commitment`` is the hex HMAC-SHA256, keyed with that salt, of the canonical JSON of the
content columns (:func:`commitment`). Their ``entry_hash`` covers the evidence columns and the
commitment, not the content. Erasure deletes the content and the salt together: what is left (the
commitment, the chain) is a keyed digest whose key is gone, so nothing stored lets anyone recover or
confirm a guessed value, and the chain still verifies entry by entry.

Entries written before ``m014`` (``content_commitment`` NULL) hash their content directly; once erased,
only their chain links can still be checked (README, "Privacy").
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Final

import msgspec

CONTENT: Final = (
    "query_string",
    "client_ip",
    "request_headers",
    "request_body",
    "request_body_sha256",
    "response_body",
    "detail",
)
"""The content columns of ``audit_log``: erased together, never hashed in the clear (from ``m014``)."""

ERASED: Final[Mapping[str, str | None]] = {
    # The columns declared NOT NULL by m001 keep an empty string once erased; a table rebuild to relax
    # the constraint would rewrite every chained row (and transform() drops the append-only triggers).
    "query_string": "",
    "client_ip": None,
    "request_headers": "",
    "request_body": None,
    "request_body_sha256": "",
    "response_body": "",
    "detail": None,
}
"""What each content column holds once erased."""

SALT_BYTES: Final = 32

_Content = msgspec.defstruct("_Content", [(name, object) for name in sorted(CONTENT)])
_encoder = msgspec.json.Encoder()


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def canonical(entry: Mapping[str, object]) -> bytes:
    """The bytes the commitment is taken over: the content columns as a JSON object with sorted keys, no
    whitespace, UTF-8, NULL as ``null``, and ``request_body`` as the lowercase hex of its exact bytes."""
    values = {name: entry[name] for name in CONTENT}
    values["request_body"] = _body_hex(values["request_body"])
    return _encoder.encode(_Content(**values))


def commitment(salt: bytes, entry: Mapping[str, object]) -> str:
    """``content_commitment``: HMAC-SHA256 keyed with the entry's salt over :func:`canonical`."""
    return hmac.new(salt, canonical(entry), hashlib.sha256).hexdigest()


def seal(row: dict[str, object], keep: bool) -> bytes | None:
    """Set ``row``'s ``content_commitment`` under a new salt; returns the salt to store with it, or, when
    the content is not to be kept, blanks the content in ``row`` and returns None (the salt is dropped:
    the commitment then hides the content for good)."""
    salt = new_salt()
    row["content_commitment"] = commitment(salt, row)
    if keep:
        return salt
    row.update(ERASED)
    return None


def is_erased(entry: Mapping[str, object]) -> bool:
    """Every content column holds its erased value."""
    return all(entry[name] == ERASED[name] for name in CONTENT)


def _body_hex(stored: object) -> str | None:
    if stored is None:
        return None
    if isinstance(stored, str):
        return stored.encode("utf-8", "surrogatepass").hex()
    if isinstance(stored, bytes | bytearray | memoryview):
        return bytes(stored).hex()
    raise TypeError(f"unexpected request_body type {type(stored).__name__}")
