"""Receipts: one entry's inclusion proof under a signed checkpoint, and consistency between two.

Ties the log (``checkpoints``, ``audit_log``), the stored tree (:mod:`topic_audit.transparency.tree`), the tree math
(:mod:`topic_audit.transparency.tlog`) and the notes (:mod:`topic_audit.transparency.note`) together. A receipt is JSON (``id``,
``leaf_index``, ``entry_hash``, ``tree_size``, ``inclusion``: base64 hashes from the leaf's sibling up,
``checkpoint``: the signed note) or the same proof as C2SP ``tlog-proof@v1`` text, whose ``extra`` line
is the leaf data (the 32 bytes of ``entry_hash``). Checking one (:mod:`topic_audit.transparency.offline`) needs
only the receipt and the pinned key.
"""

from __future__ import annotations

import base64
import sqlite3
from typing import Any, Final

from topic_audit.transparency import note, tlog, tree

TLOG_PROOF: Final = "c2sp.org/tlog-proof@v1"


class ProofError(Exception):
    """No proof can be made as asked; the message says why (and which checkpoint would do)."""


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def _checkpoint(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return dict(zip(("id", "log_size", "created_at", "note"), row, strict=True))


_SELECT: Final = "SELECT id, log_size, created_at, note FROM checkpoints WHERE note IS NOT NULL"


def _described(cp: dict[str, Any]) -> str:
    return f"checkpoint {cp['id']} (size {cp['log_size']}, {cp['created_at']})"


def checkpoint_of_size(conn: sqlite3.Connection, size: int) -> dict[str, Any]:
    """The latest checkpoint with a note of exactly ``size`` entries."""
    cp = _checkpoint(conn.execute(f"{_SELECT} AND log_size = ? ORDER BY id DESC LIMIT 1", (size,)).fetchone())
    if cp is not None:
        return cp
    below = _checkpoint(
        conn.execute(f"{_SELECT} AND log_size < ? ORDER BY log_size DESC", (size,)).fetchone()
    )
    above = _checkpoint(conn.execute(f"{_SELECT} AND log_size > ? ORDER BY log_size", (size,)).fetchone())
    near = " and ".join(_described(cp) for cp in (below, above) if cp is not None)
    raise ProofError(f"no signed checkpoint has size {size}" + (f"; the nearest: {near}" if near else ""))


def _latest(conn: sqlite3.Connection) -> dict[str, Any]:
    cp = _checkpoint(conn.execute(f"{_SELECT} ORDER BY id DESC LIMIT 1").fetchone())
    if cp is None:
        raise ProofError("no checkpoint carries a signed tree yet: `topic-audit checkpoint` signs one")
    return cp


def _tree_at(conn: sqlite3.Connection, cp: dict[str, Any]) -> tree.StoredTree:
    """The stored tree at the checkpoint's size, after checking that it gives the signed root."""
    size = cp["log_size"]
    signed = note.Checkpoint.parse(cp["note"][: cp["note"].rfind("\n\n") + 1])
    reader = tree.StoredTree(conn, size)
    if tlog.root(reader, size) != signed.root:
        raise ProofError(
            f"the stored tree does not give the root signed by {_described(cp)}: run `topic-audit verify`"
        )
    return reader


def receipt(conn: sqlite3.Connection, entry_id: int, size: int | None = None) -> dict[str, Any]:
    """The receipt of entry ``entry_id`` under the checkpoint of ``size`` entries (default: the latest)."""
    entries = tree.leaf_count(conn)
    if not 1 <= entry_id <= entries:
        raise ProofError(f"entry {entry_id} does not exist: the log has {entries} entries")
    cp = _latest(conn) if size is None else checkpoint_of_size(conn, size)
    if entry_id > cp["log_size"]:
        later = _checkpoint(
            conn.execute(f"{_SELECT} AND log_size >= ? ORDER BY id LIMIT 1", (entry_id,)).fetchone()
        )
        covering = (
            f"{_described(later)} covers it"
            if later is not None
            else "the next checkpoint will cover it (`topic-audit checkpoint` signs one now)"
        )
        raise ProofError(f"entry {entry_id} is not in {_described(cp)}: {covering}")
    (entry_hash,) = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (entry_id,)).fetchone()
    reader = _tree_at(conn, cp)
    return {
        "id": entry_id,
        "leaf_index": entry_id - 1,
        "entry_hash": entry_hash,
        "tree_size": cp["log_size"],
        "inclusion": _b64(tlog.inclusion_proof(reader, entry_id - 1, cp["log_size"])),
        "checkpoint": cp["note"],
    }


def consistency(conn: sqlite3.Connection, old_size: int, new_size: int) -> dict[str, Any]:
    """The proof that the checkpoint of ``new_size`` entries extends the one of ``old_size``."""
    if not 0 < old_size <= new_size:
        raise ProofError(
            f"a consistency proof goes from a size above 0 to one at least as large, not {old_size} to {new_size}"
        )
    old, new = checkpoint_of_size(conn, old_size), checkpoint_of_size(conn, new_size)
    _tree_at(conn, old)
    proof = tlog.consistency_proof(_tree_at(conn, new), old_size, new_size)
    return {
        "old_size": old_size,
        "new_size": new_size,
        "consistency": _b64(proof),
        "old_checkpoint": old["note"],
        "new_checkpoint": new["note"],
    }


def to_tlog_proof(receipt: dict[str, Any]) -> str:
    """The receipt as C2SP ``tlog-proof@v1`` text (the ``extra`` line carries the leaf data)."""
    extra = base64.b64encode(bytes.fromhex(receipt["entry_hash"])).decode()
    lines = [TLOG_PROOF, f"extra {extra}", f"index {receipt['leaf_index']}", *receipt["inclusion"]]
    return "\n".join(lines) + "\n\n" + str(receipt["checkpoint"])
