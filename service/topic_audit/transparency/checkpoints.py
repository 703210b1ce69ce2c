"""Signed checkpoints: Ed25519 statements of (log size, head hash, time, previous checkpoint's digest).

Each checkpoint is appended (and fsynced) to a file outside the database, then stored in the
``checkpoints`` table. The file is what an auditor trusts: a database rewritten or cut short no longer
matches the heads it holds, and a forged line fails its signature or the chain of digests.

A statement's canonical form is the JSON object of ``log_size``, ``head_hash``, ``created_at``,
``prev_digest`` and ``public_key``, keys sorted, no whitespace; ``digest`` is its SHA-256 (hex) and
``signature`` the Ed25519 signature of those bytes (hex). The first checkpoint's ``prev_digest`` is 64
zeros. ``public_key`` is the raw 32-byte key in hex. Since forwarding exists, the statement also holds
``deliveries_size`` and ``deliveries_head``: the head of the ``deliveries`` chain. Since the
transparency log exists, it also holds ``note``: the C2SP tlog-checkpoint of the log's RFC 9162 tree at
``log_size`` (``topic_audit.transparency.tree``), signed with the same key as a C2SP signed note whose key name is the
origin (``topic_audit.transparency.note``). The note is what receipts and standard tlog tooling check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from topic_audit import clock
from topic_audit.log import chain
from topic_audit.log.database import read_only
from topic_audit.transparency import note, tree

log = logging.getLogger("topic_audit.checkpoints")

STATEMENT_FIELDS: Final = ("log_size", "head_hash", "created_at", "prev_digest", "public_key")
DELIVERY_FIELDS: Final = ("deliveries_size", "deliveries_head")
"""The head of the ``deliveries`` chain (forwarding), in every checkpoint signed since it exists; a
statement holds them when the checkpoint does."""
ERASURE_FIELDS: Final = ("erasures_size", "erasures_head")
"""The head of the ``erasures`` chain, in every checkpoint signed since erasure exists."""
NOTE_FIELDS: Final = ("note",)
"""The signed tree head (a C2SP signed note), in every checkpoint signed since the tree exists."""
FACT_FIELDS: Final = ("commitments_from", "signed_erasures_from")
"""The log's fixed boundaries (``log_facts``, since ``m017``): the first entry that must carry a keyed
content commitment, and the first erasure record that must carry a signature."""
FIELDS: Final = (
    *STATEMENT_FIELDS,
    "digest",
    "signature",
    *DELIVERY_FIELDS,
    *NOTE_FIELDS,
    *ERASURE_FIELDS,
    *FACT_FIELDS,
)


def facts(conn: sqlite3.Connection) -> dict[str, int]:
    """The rows of ``log_facts`` (none before ``m017``)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'log_facts'").fetchone() is None:
        return {}
    return {str(name): int(value) for name, value in conn.execute("SELECT name, value FROM log_facts")}


def statement_bytes(checkpoint: dict[str, Any]) -> bytes:
    optional = (*DELIVERY_FIELDS, *NOTE_FIELDS, *ERASURE_FIELDS, *FACT_FIELDS)
    fields = [*STATEMENT_FIELDS, *(f for f in optional if checkpoint.get(f) is not None)]
    return json.dumps({k: checkpoint[k] for k in fields}, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    path: Path

    @property
    def public_key_hex(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    def public_key_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[Signer, bool]:
        """The key at ``path``; created (permissions 0600, its folder 0700 when new) when absent. Returns
        (signer, created). A key that group or others may read or write, or that is not an unencrypted
        PEM Ed25519 private key, is refused (:class:`topic_audit.settings.SettingsError`, saying why)."""
        from cryptography.exceptions import UnsupportedAlgorithm

        from topic_audit.settings import PREFIX, SettingsError, check_key_file

        if path.exists():
            check_key_file(path)
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                why = re.sub(r"\s*See https?://\S+ for more details\.", "", str(exc)).strip()
                raise SettingsError(
                    f"the signing key {path} cannot be read as an unencrypted PEM private key ({why}); "
                    f"restore it from its backup, or set {PREFIX}SIGNING_KEY"
                ) from None
            if not isinstance(key, Ed25519PrivateKey):
                raise SettingsError(
                    f"the signing key {path} is not an Ed25519 private key; restore it from its backup, "
                    f"or set {PREFIX}SIGNING_KEY"
                )
            return cls(key, path), False
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key, path), True


def record_key(path: Path, create: bool) -> Ed25519PrivateKey | None:
    """The signing key that signs erasure records (:func:`topic_audit.privacy.records.sign`): the checkpoint
    signing key at ``path``, created when absent if ``create`` (``serve``'s writer does: its policy and
    retention records are always signed), else None (``erase`` without a key: the records are written
    unsigned, and ``verify`` reports them once the log has a signer)."""
    if not create and not path.exists():
        return None
    try:
        signer, created = Signer.load_or_create(path)
    except FileExistsError:  # another process of serve created it first
        signer, created = Signer.load_or_create(path)
    if created:
        log.warning(
            "created checkpoint signing key %s (0600); export its public key with `topic-audit public-key` "
            "and keep it where the auditors are",
            path,
        )
    return signer.key


def read_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_checkpoint(
    conn: sqlite3.Connection,
    signer: Signer,
    file: Path,
    created_at: str,
    origin: str | None = None,
    check: Callable[[sqlite3.Connection], None] | None = None,
) -> dict[str, Any]:
    """Sign the current head and append it to ``file`` (fsynced), then to the table, under the write lock,
    without checking what it signs: ``serve`` and ``topic-audit checkpoint`` sign through
    :func:`topic_audit.writer.signer.checkpoint`, which does.

    The tree's new tiles are stored first, outside the lock (in commits of their own); the note signs
    the tree at the head under ``origin`` (default: the latest note's, see :func:`default_origin`).
    ``check`` runs under the lock before anything is signed; what it raises aborts the checkpoint."""
    tree.update(conn)
    origin = origin or default_origin(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        drop_partial_line(file)
        lines = _catch_up(conn, file)
        if check is not None:
            check(conn)
        head = conn.execute("SELECT id, entry_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
        size, head_hash = head if head is not None else (0, chain.GENESIS)
        last = conn.execute("SELECT digest FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        delivered = conn.execute("SELECT id, entry_hash FROM deliveries ORDER BY id DESC LIMIT 1").fetchone()
        checkpoint: dict[str, Any] = {
            "log_size": size,
            "head_hash": head_hash,
            "created_at": created_at,
            "prev_digest": lines[-1]["digest"] if lines else (last[0] if last is not None else chain.GENESIS),
            "public_key": signer.public_key_hex,
            "deliveries_size": delivered[0] if delivered is not None else 0,
            "deliveries_head": delivered[1] if delivered is not None else chain.GENESIS,
            "note": note.sign(
                note.Checkpoint(origin, size, tree.root(conn, size)).text(), origin, signer.key
            ),
        }
        erased = conn.execute("SELECT id, entry_hash FROM erasures ORDER BY id DESC LIMIT 1").fetchone()
        checkpoint["erasures_size"] = erased[0] if erased is not None else 0
        checkpoint["erasures_head"] = erased[1] if erased is not None else chain.GENESIS
        checkpoint |= {name: value for name, value in facts(conn).items() if name in FACT_FIELDS}
        signed = statement_bytes(checkpoint)
        checkpoint["digest"] = hashlib.sha256(signed).hexdigest()
        checkpoint["signature"] = signer.key.sign(signed).hex()
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(checkpoint, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _insert(conn, checkpoint)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return checkpoint


def age_seconds(db: Path) -> float:
    """Seconds since the last checkpoint of the database at ``db`` was signed (0 before the first)."""
    conn = read_only(db)
    try:
        row = conn.execute("SELECT created_at FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # not migrated yet
        return 0.0
    finally:
        conn.close()
    if row is None:
        return 0.0
    signed = clock.parse(str(row[0]))
    return max((datetime.now(UTC) - signed).total_seconds(), 0.0)


def note_origin(conn: sqlite3.Connection) -> str | None:
    """The origin of the latest checkpoint note, if any."""
    row = conn.execute(
        "SELECT note FROM checkpoints WHERE note IS NOT NULL ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return None if row is None else str(row[0]).split("\n", 1)[0]


def latest_origin(db: Path) -> str | None:
    """:func:`note_origin` of the database at ``db`` (read-only; None before the tree existed)."""
    conn = read_only(db)
    try:
        return note_origin(conn)
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def default_origin(conn: sqlite3.Connection) -> str:
    """The latest note's origin; before any, ``topic-audit/<SdkAppid of the first accepted entry>``
    (for callers that do not pass the configured one)."""
    origin = note_origin(conn)
    if origin is not None:
        return origin
    app = conn.execute("SELECT sdk_app_id FROM audit_log WHERE outcome = 'accepted' LIMIT 1").fetchone()
    return f"topic-audit/{app[0] if app is not None else 'unknown'}"


def _insert(conn: sqlite3.Connection, checkpoint: dict[str, Any]) -> None:
    conn.execute(
        f"INSERT INTO checkpoints ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})",
        [checkpoint.get(k) for k in FIELDS],
    )


def _catch_up(conn: sqlite3.Connection, file: Path) -> list[dict[str, Any]]:
    """A crash between the file's fsync and the table's commit leaves the file one checkpoint ahead:
    record that (signed) checkpoint in the table too, so that the next one chains to it in both."""
    lines = read_file(file)
    stored = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
    if len(lines) == stored + 1 and signature_ok(lines[-1]):
        _insert(conn, lines[-1])
    return lines


def drop_partial_line(file: Path) -> None:
    """A crash while appending can leave half a line (never recorded in the table): cut it off."""
    if not file.exists():
        return
    with file.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def signature_ok(checkpoint: dict[str, Any]) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(checkpoint["public_key"]))
        key.verify(bytes.fromhex(checkpoint["signature"]), statement_bytes(checkpoint))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return hashlib.sha256(statement_bytes(checkpoint)).hexdigest() == checkpoint.get("digest")


def load_public_key(text: str) -> str:
    """A pinned public key given as raw hex or as PEM text; returns raw hex."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    bytes.fromhex(text)
    return text.lower()
