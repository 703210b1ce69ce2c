"""The ``erasures`` records: what one says, its canonical form and hash, and the digests it commits to.

A record is chained like ``deliveries`` (``prev_hash``, ``entry_hash`` over its canonical JSON), signed
since ``m017`` (``signature``: Ed25519 under the checkpoint signing key over :func:`signed_bytes`, so that
write access to the database alone cannot mint one), and commits to the ids it erased (``entries_digest``), to their evidence and their delivery attempts'
(``evidence_digest``), to what the projection replays in place of its erased topic events
(``effects_digest``, since ``m016``), and to its selector through a keyed digest
(``selector_digest``), never the value itself. :mod:`topic_audit.integrity.erasures` checks them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from topic_audit.forwarding import outbox
from topic_audit.log import chain, content
from topic_audit.log.chain import GENESIS

COLUMNS: Final = (
    "id",
    "erased_at",
    "cause",
    "reason",
    "selector_digest",
    "first_id",
    "last_id",
    "entries",
    "entries_digest",
    "evidence_digest",
    "deliveries_upto",
    "effects_digest",
    "prev_hash",
    "entry_hash",
)
_SORTED: Final = tuple(sorted(c for c in COLUMNS if c != "entry_hash"))
LATER: Final = ("effects_digest",)
"""Columns added after the first records were written (``m016``): hashed only when not NULL, so that
every record written before keeps its hash."""
EVIDENCE: Final = tuple(c for c in chain.COLUMNS if c not in content.CONTENT)
"""The evidence columns of ``audit_log``, in table order."""
DELIVERY_EVIDENCE: Final = tuple(c for c in outbox.COLUMNS if c not in ("response_body", "detail"))


@dataclass(frozen=True, slots=True)
class Erasure:
    """One recorded erasure: its ``erasures`` row."""

    id: int
    first_id: int
    last_id: int
    entries: int
    entry_hash: str
    indexed: bool = False
    """Whether a search index held some of its entries (then :func:`purge` must merge it)."""


def record_json(row: dict[str, Any]) -> bytes:
    """A record's canonical JSON, the form :func:`record_hash` hashes: every column but ``entry_hash``,
    keys sorted, no whitespace, a column of :data:`LATER` only when not NULL -- and, unlike the entries'
    and the deliveries' forms, non-ASCII characters escaped (``\\uXXXX``, ``json.dumps``' default). Frozen
    by the records already hashed: a record holds a reason an operator typed, so changing it would break
    their chain."""
    shown = {c: row.get(c) for c in _SORTED if c not in LATER or row.get(c) is not None}
    return json.dumps(shown, sort_keys=True, separators=(",", ":")).encode()


def record_hash(row: dict[str, Any]) -> str:
    """``erasures.entry_hash``: SHA-256 of :func:`record_json`, chained through ``prev_hash``."""
    return hashlib.sha256(record_json(row)).hexdigest()


def digest_json(value: object) -> str:
    """SHA-256 of ``value`` as JSON with no whitespace, UTF-8 as it is (the form of the digests a record
    commits to: :func:`effects_digest`, :func:`evidence_digest`)."""
    return hashlib.sha256(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def effects_digest(entries: Iterable[tuple[int, str | None]]) -> str:
    """SHA-256 of the erased entries' ``effects`` (what the projection replays in their place): the JSON
    array of ``[entry_id, effects]`` pairs, ascending, no whitespace, UTF-8."""
    return digest_json(sorted(entries, key=lambda pair: pair[0]))


def entries_digest(ids: Iterable[int]) -> str:
    """SHA-256 of the erased ids, ascending, comma-separated: what a record says it erased."""
    return hashlib.sha256(",".join(str(i) for i in sorted(ids)).encode()).hexdigest()


def evidence_digest(conn: sqlite3.Connection, ids: Sequence[int], deliveries_upto: int) -> str:
    """SHA-256 of the evidence of entries ``ids`` and of their delivery attempts, as they are: erasure
    leaves the evidence as it was, and the record that commits to it keeps it checkable where the
    entry's own hash no longer can be (entries written before keyed commitments; the attempts, whose
    hash covers the app's erased answer) -- the attempts recorded by the time of the erasure
    (``deliveries_upto``), since a later one is chained and hashed as any other."""
    marks = ", ".join("?" * len(ids))
    entries = conn.execute(
        f"SELECT {', '.join(EVIDENCE)} FROM audit_log WHERE id IN ({marks}) ORDER BY id", list(ids)
    ).fetchall()
    attempts = conn.execute(
        f"SELECT {', '.join(DELIVERY_EVIDENCE)} FROM deliveries WHERE audit_id IN ({marks}) AND id <= ? "
        "ORDER BY id",
        [*ids, deliveries_upto],
    ).fetchall()
    return digest_json([entries, attempts])


def selector_digest(key: bytes, kind: str, value: str) -> str:
    """A keyed digest of the selector (never the value): with the key, the operator can show which
    selector a record answered; without it, nobody can confirm a guess."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def signed_bytes(entry_hash: str) -> bytes:
    """What a record's ``signature`` signs: a context line, then its ``entry_hash`` (hex), each ending
    in a newline -- a record signature can never be mistaken for a checkpoint's or a note's."""
    return f"topic-audit erasure record\n{entry_hash}\n".encode()


def sign(key: Ed25519PrivateKey, entry_hash: str) -> str:
    """``erasures.signature`` (hex) of the record whose hash is ``entry_hash``."""
    return key.sign(signed_bytes(entry_hash)).hex()


def signature_ok(public_key_hex: str, entry_hash: str, signature: object) -> bool:
    """Whether ``signature`` is the signature of ``entry_hash`` under the key ``public_key_hex``."""
    if not isinstance(signature, str):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature), signed_bytes(entry_hash))
    except (InvalidSignature, ValueError):
        return False
    return True


def insert_record(
    conn: sqlite3.Connection,
    entries: Sequence[tuple[int, str | None]],
    cause: str,
    reason: str,
    selector: str | None,
    now: str,
    key: Ed25519PrivateKey | None = None,
) -> Erasure:
    """Append the record of erasing ``entries`` ((id, effects), ascending) and list them under it, in the
    caller's transaction; the entries' evidence must already be in the table. Signed with ``key`` (the
    checkpoint signing key); without it the record is unsigned, and ``verify`` and the signer take it
    for a forgery (every caller in the product passes the key; tests build records without it)."""
    head = conn.execute("SELECT id, entry_hash FROM erasures ORDER BY id DESC LIMIT 1").fetchone()
    head_id, head_hash = head if head is not None else (0, GENESIS)
    erased = [entry_id for entry_id, _ in entries]
    upto = int(conn.execute("SELECT coalesce(max(id), 0) FROM deliveries").fetchone()[0])
    record: dict[str, Any] = {
        "id": head_id + 1,
        "erased_at": now,
        "cause": cause,
        "reason": reason,
        "selector_digest": selector,
        "first_id": erased[0],
        "last_id": erased[-1],
        "entries": len(erased),
        "entries_digest": entries_digest(erased),
        "evidence_digest": evidence_digest(conn, erased, upto),
        "deliveries_upto": upto,
        "effects_digest": effects_digest(entries),
        "prev_hash": head_hash,
    }
    record["entry_hash"] = record_hash(record)
    columns = list(COLUMNS)
    if key is not None:
        columns.append("signature")
        record["signature"] = sign(key, record["entry_hash"])
    conn.execute(
        f"INSERT INTO erasures ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        [record[c] for c in columns],
    )
    conn.executemany(
        "INSERT INTO erased_entries (entry_id, erasure_id, effects) VALUES (?, ?, ?)",
        [(entry_id, record["id"], effects) for entry_id, effects in entries],
    )
    return Erasure(record["id"], erased[0], erased[-1], len(erased), record["entry_hash"])


def selector_key(signing_key: Ed25519PrivateKey) -> bytes:
    """The key of :func:`selector_digest`, derived from the checkpoint signing key."""
    raw = signing_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return hmac.new(raw, b"topic-audit erasure selectors", hashlib.sha256).digest()
