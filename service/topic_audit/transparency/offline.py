"""Checking a receipt or a consistency proof offline: the file and the pinned key, no database.

What is checked, in order, each failure a :class:`ReceiptError` whose one line says which: the file's
form (JSON receipt, C2SP ``tlog-proof@v1`` text, or JSON consistency proof), each checkpoint's origin
against the expected one (the vkey's name, or ``TOPIC_AUDIT_LOG_ORIGIN``), its signature by the pinned
key, then the proof against the signed root.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from topic_audit.transparency import note, tlog
from topic_audit.transparency.checkpoints import load_public_key
from topic_audit.transparency.receipts import TLOG_PROOF


class ReceiptError(ValueError):
    """The receipt does not hold; the message is one line saying why."""


@dataclass(frozen=True)
class Key:
    """The pinned log key: a vkey (name and key), or a raw key whose name is the origin."""

    public_key: bytes
    name: str | None = None

    def verifier(self, origin: str) -> note.Verifier:
        return note.Verifier.for_key(self.name or origin, self.public_key)


def load_key(text: str) -> Key:
    """``TOPIC_AUDIT_PUBLIC_KEY`` as given: raw hex, PEM text, or a vkey."""
    text = text.strip()
    if "+" in text and not text.startswith("-----BEGIN"):
        verifier = note.Verifier.from_vkey(text)
        return Key(verifier.public_key, verifier.name)
    return Key(bytes.fromhex(load_public_key(text)))


def _hashes(items: Any, what: str) -> list[bytes]:
    try:
        hashes = [base64.b64decode(h, validate=True) for h in items]
    except (binascii.Error, TypeError, ValueError):
        raise ReceiptError(f"malformed receipt: {what} is not a list of base64 hashes") from None
    if any(len(h) != 32 for h in hashes):
        raise ReceiptError(f"malformed receipt: {what} holds a hash that is not 32 bytes")
    return hashes


def parse(text: str) -> dict[str, Any]:
    """A receipt (JSON or tlog-proof) or a consistency proof (JSON), as a dict of the JSON form."""
    if text.startswith(TLOG_PROOF + "\n"):
        return _parse_tlog_proof(text)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise ReceiptError("malformed receipt: neither JSON nor c2sp.org/tlog-proof@v1 text") from None
    needed = (
        ("old_size", "new_size", "consistency", "old_checkpoint", "new_checkpoint")
        if isinstance(doc, dict) and "consistency" in doc
        else ("id", "leaf_index", "entry_hash", "tree_size", "inclusion", "checkpoint")
    )
    if not isinstance(doc, dict) or any(k not in doc for k in needed):
        raise ReceiptError(f"malformed receipt: a receipt holds {', '.join(needed)}")
    return doc


def _parse_tlog_proof(text: str) -> dict[str, Any]:
    head, sep, checkpoint = text.partition("\n\n")
    lines = head.split("\n")[1:]
    try:
        extra = base64.b64decode(lines.pop(0).removeprefix("extra "), validate=True)
        index = lines.pop(0)
    except (IndexError, binascii.Error):
        raise ReceiptError("malformed receipt: no 'extra <base64 entry_hash>' line") from None
    if not sep or len(extra) != 32 or not index.startswith("index ") or not index[6:].isdigit():
        raise ReceiptError(
            "malformed receipt: a tlog-proof has extra, index, hashes, a blank line, a checkpoint"
        )
    return {
        "id": int(index[6:]) + 1,
        "leaf_index": int(index[6:]),
        "entry_hash": extra.hex(),
        "tree_size": None,
        "inclusion": lines,
        "checkpoint": checkpoint,
    }


def open_checkpoint(text: Any, key: Key, origin: str | None) -> note.Checkpoint:
    """The checkpoint of a signed note, once its origin and its signature by ``key`` are checked."""
    if not isinstance(text, str):
        raise ReceiptError("malformed receipt: the checkpoint is not a signed note")
    try:
        body = note.Checkpoint.parse(text[: text.rfind("\n\n") + 1])
    except note.NoteError as exc:
        raise ReceiptError(f"malformed receipt: {exc}") from None
    for expected in (origin, key.name):
        if expected is not None and body.origin != expected:
            raise ReceiptError(f"the receipt is for another origin: {body.origin!r}, not {expected!r}")
    try:
        note.open_note(text, key.verifier(body.origin))
    except note.UnknownKey as exc:
        raise ReceiptError(f"the checkpoint is signed by another key: {exc}") from None
    except note.BadSignature as exc:
        raise ReceiptError(f"the checkpoint's signature does not verify: {exc}") from None
    except note.NoteError as exc:
        raise ReceiptError(f"malformed receipt: {exc}") from None
    return body


def check(text: str, key: Key, origin: str | None = None, entry_hash: str | None = None) -> str:
    """Check a receipt or a consistency proof; returns what it proves, in one line."""
    doc = parse(text)
    if "consistency" in doc:
        return _check_consistency(doc, key, origin)
    cp = open_checkpoint(doc["checkpoint"], key, origin)
    index, size = doc["leaf_index"], doc["tree_size"]
    if not isinstance(index, int) or doc["id"] != index + 1 or size not in (None, cp.size):
        raise ReceiptError("malformed receipt: id, leaf_index and tree_size disagree with the checkpoint")
    try:
        leaf = bytes.fromhex(doc["entry_hash"])
    except (TypeError, ValueError):
        leaf = b""
    if len(leaf) != 32:
        raise ReceiptError("malformed receipt: entry_hash is not 64 hex digits")
    if entry_hash is not None and entry_hash.lower() != leaf.hex():
        raise ReceiptError(f"the receipt is for entry_hash {leaf.hex()}, not {entry_hash.lower()}")
    if not tlog.verify_inclusion(
        tlog.leaf_hash(leaf), index, cp.size, _hashes(doc["inclusion"], "inclusion"), cp.root
    ):
        raise ReceiptError(
            f"the inclusion proof does not verify: entry {doc['id']} is not in the signed tree"
        )
    return f"OK: entry {doc['id']} (entry_hash {leaf.hex()}) is in {cp.origin} at size {cp.size}"


def _check_consistency(doc: dict[str, Any], key: Key, origin: str | None) -> str:
    old = open_checkpoint(doc["old_checkpoint"], key, origin)
    new = open_checkpoint(doc["new_checkpoint"], key, origin)
    if (doc["old_size"], doc["new_size"]) != (old.size, new.size) or old.origin != new.origin:
        raise ReceiptError("malformed receipt: old_size and new_size disagree with the checkpoints")
    proof = _hashes(doc["consistency"], "consistency")
    if not tlog.verify_consistency(old.size, new.size, old.root, new.root, proof):
        raise ReceiptError(
            f"the consistency proof does not verify: size {new.size} does not extend size {old.size}"
        )
    return f"OK: {new.origin} at size {new.size} extends size {old.size}"
