"""Every connection to the database, and the write transactions: :func:`connect` (a write connection) and
:func:`read_only` are the only two ways anything opens it.

A write connection is in autocommit mode (``isolation_level=None``): nothing is in a transaction unless
it says so, with :func:`transaction`. The database is in WAL mode with ``synchronous=FULL``, so a
COMMIT returns only once the transaction is on the disk; a commit waits at most
:data:`BUSY_TIMEOUT_SECONDS` for another process's write lock.

Every write takes the write lock when it begins (``BEGIN IMMEDIATE``), not at its first write: what it
reads (the chain head, a topic, the last checkpoint) cannot change under it, so several processes on
one file still build one contiguous chain. A transaction that fails is rolled back, unless SQLite
already did (a full disk, an I/O error or a busy lock end the transaction by themselves; a ROLLBACK then
would replace the real error by "no transaction is active").

The database is private to the service's user, whatever the umask it was started with
(:func:`private`): the data folder is 0700, the database file 0600 (SQLite creates ``-wal`` and
``-shm`` with the database file's mode), and every process that writes it runs with umask 077, so
that what it and its children (Litestream) create beside it -- checkpoint file, locks, Litestream's
folder, a restored copy -- is 0600 too. An existing deployment's folder and files are tightened the
same way when a command that writes starts, and a warning names each one it changed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

from topic_audit.log import chain

BUSY_TIMEOUT_SECONDS = 1.0
"""How long a commit waits for another process's lock: well inside Tencent's 2 s timeout."""
TOOL_TIMEOUT_SECONDS = 10.0
"""How long a command or a reader beside the writer waits for a lock: it answers nobody within 2 s, and a
write of ``serve``'s (a group, a purge step) holds the lock for milliseconds."""
PRIVATE = 0o077
"""The permission bits of group and others: never set on the data folder or anything in it."""

log = logging.getLogger("topic_audit.database")


def private(db: Path, *also: Path) -> None:
    """Make ``db`` private to this user, whatever the umask: this process (and every child it starts)
    creates files 0600 and folders 0700 from now on; the data folder (``db``'s folder, created when
    absent) is 0700; the database (created empty when absent), its ``-wal``/``-shm`` and every file or
    folder named after it (``<db>.checkpoints.jsonl``, locks, ``.<db>-litestream``), and the files in
    ``also`` that exist (a checkpoint file kept elsewhere), lose any group and others permission.

    A folder that others must keep using is left as it is, with a warning: one with the sticky bit
    (``/tmp``), the home folder, or one owned by another user.
    """
    folder = private_folder(db.parent)
    if not db.exists():
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
    for entry in folder.iterdir():
        if entry.name.startswith((db.name, f".{db.name}")):
            _tighten(entry)
    for path in also:
        if path.exists():
            _tighten(path)


def private_folder(folder: Path) -> Path:
    """This process creates files 0600 and folders 0700 from now on (umask 077, which its children
    inherit); ``folder`` is created 0700 when absent, or tightened (see :func:`private`)."""
    os.umask(os.umask(PRIVATE) | PRIVATE)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten_folder(folder)
    return folder


def _tighten_folder(folder: Path) -> None:
    info = folder.stat()
    if not stat.S_IMODE(info.st_mode) & PRIVATE:
        return
    shared = info.st_mode & stat.S_ISVTX or info.st_uid != os.geteuid()
    if shared or folder.resolve() == _home():
        log.warning(
            "the data folder %s is open to other users (mode %o): keep the database in a folder of its own",
            folder,
            stat.S_IMODE(info.st_mode),
        )
        return
    _tighten(folder, recurse=False)


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (KeyError, RuntimeError):  # no home folder for this user
        return None


def _tighten(path: Path, recurse: bool = True) -> None:
    """Drop group and others' permissions from ``path`` (and, for a folder, all it holds)."""
    try:
        info = path.lstat()
    except FileNotFoundError:  # gone meanwhile (another process's -shm, a lock)
        return
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & PRIVATE:
        os.chmod(path, mode & ~PRIVATE)
        log.warning("%s was open to other users (mode %o): now %o", path, mode, mode & ~PRIVATE)
    if recurse and stat.S_ISDIR(info.st_mode):
        for entry in path.iterdir():
            _tighten(entry)


def connect(
    path: Path | str, autocheckpoint: bool = True, timeout: float = BUSY_TIMEOUT_SECONDS
) -> sqlite3.Connection:
    """A write connection: autocommit mode (explicit transactions), WAL, ``synchronous=FULL``.

    Without ``autocheckpoint``, this connection never checkpoints the WAL: with an off-box replica,
    Litestream does (its guidance for busy writers), so that no checkpoint races its reading of the WAL.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if not autocheckpoint:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


def read_only(path: Path | str, timeout: float = TOOL_TIMEOUT_SECONDS) -> sqlite3.Connection:
    """A read-only connection (``mode=ro``, autocommit; any thread): it can neither write nor take the
    write lock, so no reader -- ``verify``, ``watch``, the proofs, Litestream's checks -- can stall the
    writer."""
    return sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=timeout
    )


@contextmanager
def transaction(
    conn: sqlite3.Connection, mode: Literal["IMMEDIATE", "DEFERRED"] = "IMMEDIATE"
) -> Iterator[sqlite3.Connection]:
    """One transaction on ``conn`` (autocommit mode): committed when the block ends, rolled back when it
    raises (the exception goes on).

    ``IMMEDIATE`` (every write) takes the write lock at once; ``DEFERRED`` is a read snapshot: what the
    block reads is one consistent state of the database, whatever is committed meanwhile.
    """
    conn.execute(f"BEGIN {mode}")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
            conn.execute("ROLLBACK")
        raise


class Durability(NamedTuple):
    """What a connection promises about a commit (compares equal to the plain tuple)."""

    synchronous: int
    """2 is FULL: a commit is synced before it returns."""
    wal_autocheckpoint: int
    """Pages after which a commit checkpoints the WAL; 0 when Litestream checkpoints instead."""
    journal_mode: str


def durability(conn: sqlite3.Connection) -> Durability:
    """The pragmas of ``conn`` that the writer's guarantees rest on."""
    return Durability(
        int(conn.execute("PRAGMA synchronous").fetchone()[0]),
        int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]),
        str(conn.execute("PRAGMA journal_mode").fetchone()[0]),
    )


def exists(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the schema has a table, index, view or trigger called ``name``."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """The last log entry's id and entry hash, ``(0, chain.GENESIS)`` for an empty log; read it under
    the write lock to append after it."""
    found = conn.execute("SELECT id, entry_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    return (0, chain.GENESIS) if found is None else (found[0], found[1])
