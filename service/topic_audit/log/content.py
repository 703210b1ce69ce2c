"""Content and evidence of a log entry, and the keyed commitment that lets content be forgotten.

*Content* is whatever can identify a person or says what they did: the request body (and the unsalted
SHA-256 that stands for it), the query string (it holds the end user's ``ClientIP``), ``client_ip``, the
request headers, our answer and the ``detail`` text. *Evidence* is the rest: ids, times, command,
outcome, reason, status, sizes, the group and topic ids, the chain links. Erasing an entry removes its
content and keeps its evidence (docs/privacy.md).

Entries written since migration ``m014`` commit to their content through a keyed commitment: each entry
gets 32 random bytes (``content_keys.salt``, written in the same transaction as the entry) and
``content_commitment`` is the hex HMAC-SHA256, keyed with that salt, of the canonical JSON of the
content columns (:func:`commitment`). Their ``entry_hash`` covers the evidence columns and the
commitment, not the content. Erasure deletes the content and the salt together: what is left (the
commitment, the chain) is a keyed digest whose key is gone, so nothing stored lets anyone recover or
confirm a guessed value, and the chain still verifies entry by entry.

Entries written before ``m014`` (``content_commitment`` NULL) hash their content directly; once erased,
only their chain links can still be checked (docs/privacy.md, "Keyed commitments").

A stored body is whatever bytes anyone on the network sent: every tool that reads one as JSON (the
selectors of ``erase``, the redaction of an erased topic event, the projection's replay, Datasette's
pages) goes through :func:`parse_json` or :func:`decode`, which turn every way a body can fail to be JSON
-- nested past msgspec's depth, not UTF-8, cut short, numbers out of range, a bare ``NaN``, not text at
all -- into "not JSON" (:data:`NOT_JSON`, or :class:`msgspec.DecodeError`) and never into an exception
that stops the tool. How deep a body may nest does not depend on where it is decoded from: a decode that
runs out of stack is tried again on a fresh thread (the receiver's own check runs deeper in its stack than
that, so every body it accepted decodes there).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Mapping
from typing import Final, TypeVar

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


def seal(row: dict[str, object], keep: bool, salt: bytes | None = None) -> bytes | None:
    """Set ``row``'s ``content_commitment`` under ``salt`` (default: a new one); returns the salt to store
    with it, or, when the content is not to be kept, blanks the content in ``row`` and returns None (the
    salt is dropped: the commitment then hides the content for good)."""
    salt = salt or new_salt()
    row["content_commitment"] = commitment(salt, row)
    if keep:
        return salt
    row.update(ERASED)
    return None


def is_erased(entry: Mapping[str, object]) -> bool:
    """Every content column holds its erased value."""
    return all(entry[name] == ERASED[name] for name in CONTENT)


class NotJson:
    """The type of :data:`NOT_JSON`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_JSON"


NOT_JSON: Final = NotJson()
"""What :func:`parse_json` gives for a body that is not JSON (None is a JSON value: ``null``)."""

T = TypeVar("T")
_any_json = msgspec.json.Decoder()


def parse_json(stored: object) -> object:
    """The JSON value of a stored ``request_body`` (TEXT, or a BLOB when not UTF-8), or :data:`NOT_JSON`
    for anything else it may hold -- whatever the bytes; never raises. Duplicate keys: the last wins (as
    the receiver read them); numbers beyond 64-bit integers or doubles, ``NaN`` and lone surrogates are
    not JSON here (msgspec's rules, the receiver's)."""
    try:
        return decode(_any_json.decode, stored)
    except ValueError:  # msgspec.DecodeError
        return NOT_JSON


def decode(decoder: Callable[[str | bytes], T], stored: object) -> T:
    """``decoder(stored)`` (a msgspec decoder's ``decode``) for a stored body, raising only
    :class:`msgspec.DecodeError` (a ``ValueError``; :class:`msgspec.ValidationError` for a body of the
    wrong shape) when the body does not decode: also when it is not text or bytes, and when it nests
    deeper than a decode on a fresh thread's stack allows (see the module docstring)."""
    if isinstance(stored, memoryview | bytearray):
        stored = bytes(stored)
    if not isinstance(stored, str | bytes):
        raise msgspec.DecodeError(f"not JSON text: {type(stored).__name__}")
    try:
        return decoder(stored)
    except RecursionError:
        return _on_fresh_stack(decoder, stored)
    except UnicodeError as exc:  # text with lone surrogates (never read from SQLite, but say so)
        raise msgspec.DecodeError(f"not UTF-8: {exc}") from None


def _on_fresh_stack(decoder: Callable[[str | bytes], T], stored: str | bytes) -> T:
    """``decoder(stored)`` on a new thread, whose stack holds nothing else: the depth a body may nest to
    is then the same wherever it is decoded from."""
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(decoder(stored))
        except RecursionError:
            outcome.append(msgspec.DecodeError("JSON is nested too deeply"))
        except UnicodeError as exc:
            outcome.append(msgspec.DecodeError(f"not UTF-8: {exc}"))
        except Exception as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=run, name="topic-audit-decode", daemon=True)
    thread.start()
    thread.join()
    found = outcome[0] if outcome else msgspec.DecodeError("JSON could not be decoded")
    if isinstance(found, BaseException):
        raise found
    return found


def _body_hex(stored: object) -> str | None:
    if stored is None:
        return None
    if isinstance(stored, str):
        return stored.encode("utf-8", "surrogatepass").hex()
    if isinstance(stored, bytes | bytearray | memoryview):
        return bytes(stored).hex()
    raise TypeError(f"unexpected request_body type {type(stored).__name__}")
