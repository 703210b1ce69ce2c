"""Datasette over the live audit database, served as ``audit`` (read-only, never immutable).

Reads go through ``mode=ro`` connections while the receiver writes (WAL), so auditors always see the
newest committed rows. The configuration lives in ``dashboard/`` (metadata and templates), shipped inside
the package as ``topic_audit.dashboard`` and found with :mod:`importlib.resources`, so an installed wheel
needs nothing from the source tree; :mod:`topic_audit.auditor.screens` is registered as a plugin for what the
templates need beyond Datasette's own context.

Datasette answers arbitrary read-only SQL, so two things stand in front of it. Only requests naming an
allowed ``Host`` reach it (:class:`HostCheck`; loopback names by default): a web page elsewhere cannot
point a DNS name of its own at 127.0.0.1 and read the log through a visitor's browser (DNS rebinding).
And every connection it opens has ``fts3_tokenizer()`` replaced by a function that refuses
(:func:`prepare_connection`): with ``SQLITE_ENABLE_FTS3_TOKENIZER`` (Debian's SQLite) it returns a raw
pointer, and with two arguments would install one.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from importlib import resources
from pathlib import Path
from typing import Any

import pluggy
import yaml
from datasette.app import Datasette
from datasette.database import Database
from datasette.plugins import pm

from topic_audit.auditor import screens
from topic_audit.settings import is_loopback

DASHBOARD = Path(str(resources.files("topic_audit.dashboard")))
"""Datasette's metadata and templates: ``dashboard/`` in the tree, ``topic_audit/dashboard`` when installed."""
DATABASE_NAME = screens.DATABASE_NAME
hookimpl = pluggy.HookimplMarker("datasette")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
"""The ``Host`` names allowed when Datasette is bound to loopback and none are configured."""
ALLOWED_HOSTS_ENV = "TOPIC_AUDIT_EXPLORE_ALLOWED_HOSTS"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


def _split_host(value: str) -> tuple[str, str | None] | None:
    """``name[:port]`` as (lower-case name, port or None); IPv6 names keep their brackets. None when
    malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not name or name == "[]":
        return None
    if not rest:
        return name, None
    if rest[0] != ":" or not rest[1:].isdigit():
        return None
    return name, rest[1:]


def allowed_hosts(bind: str, given: Iterable[str] = ()) -> tuple[str, ...]:
    """The ``Host`` names Datasette answers: ``given`` (``name`` for any port, ``name:port`` for that
    port only), else the loopback names when bound to loopback. Off loopback the operator must name
    them: there is no safe default for the names a server is reached by."""
    names = tuple(n for part in given for n in part.replace(",", " ").split())
    for name in names:
        if _split_host(name) is None:
            raise AccessError(f"{ALLOWED_HOSTS_ENV}: {name!r} is not a host name (name or name:port)")
    if names:
        return names
    if is_loopback(bind):
        return LOOPBACK_HOSTS
    raise AccessError(
        f"Datasette on {bind} answers only the Host names you list: set {ALLOWED_HOSTS_ENV} (or "
        "--allowed-host) to the names auditors use to reach it, e.g. audit.example.com"
    )


class HostCheck:
    """ASGI middleware: a request whose ``Host`` header is not allowed is answered 400 before Datasette
    sees it (so are requests without one)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed: set[tuple[str, str | None]] = {h for h in map(_split_host, allowed) if h is not None}

    def permits(self, host: str | None) -> bool:
        found = None if host is None else _split_host(host)
        return found is not None and (found in self.allowed or (found[0], None) in self.allowed)

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] in ("http", "websocket"):
            hosts = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"host"]
            if len(hosts) != 1 or not self.permits(hosts[0]):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"400 Bad Request: this Host is not served here\n"
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _refuse(*_args: object) -> None:
    raise sqlite3.DatabaseError("fts3_tokenizer() is disabled in topic-audit explore")


@hookimpl
def prepare_connection(conn: sqlite3.Connection) -> None:
    """Every connection Datasette opens: ``fts3_tokenizer()`` (1 and 2 arguments) refuses."""
    for arguments in (1, 2):
        conn.create_function("fts3_tokenizer", arguments, _refuse)


def load_metadata(directory: Path = DASHBOARD) -> dict[str, Any]:
    with (directory / "metadata.yml").open(encoding="utf-8") as f:
        metadata: dict[str, Any] = yaml.safe_load(f)
    return metadata


PASSWORD_HASH_ENV = "TOPIC_AUDIT_AUDITOR_PASSWORD_HASH"
API_TOKEN_ENV = "TOPIC_AUDIT_API_TOKEN"


class AccessError(ValueError):
    """Datasette would serve the log to anonymous users on a non-loopback address."""


def access_config(host: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Metadata for who may read: open on loopback; elsewhere a logged-in auditor or an API token.

    Secrets stay in the environment: the metadata holds ``$env`` references, which Datasette resolves
    when a plugin reads its configuration (and never shows in /-/metadata).
    """
    plugins: dict[str, Any] = {}
    if environ.get(PASSWORD_HASH_ENV):
        plugins["datasette-auth-passwords"] = {
            "auditor_password_hash": {"$env": PASSWORD_HASH_ENV},
            "actors": {"auditor": {"id": "auditor", "role": "auditor"}},
        }
    if environ.get(API_TOKEN_ENV):
        plugins["datasette-auth-tokens"] = {
            "tokens": [{"token": {"$env": API_TOKEN_ENV}, "actor": {"id": "api"}}]
        }
    config: dict[str, Any] = {"plugins": plugins}
    if not is_loopback(host):
        if not plugins:
            raise AccessError(
                f"refusing to serve the audit log on {host} to anonymous users: set {PASSWORD_HASH_ENV} "
                f"(see `topic-audit hash-password`) and/or {API_TOKEN_ENV}, or bind to loopback"
            )
        config["allow"] = {"id": "*"}  # any signed-in actor; anonymous users are refused
    return config


def make_datasette(
    db: Path, host: str = "127.0.0.1", environ: Mapping[str, str] | None = None, directory: Path = DASHBOARD
) -> Datasette:
    """A Datasette instance serving ``db`` as ``audit`` (read-only), configured from ``directory``."""
    if not db.exists():
        raise FileNotFoundError(
            f"{db} does not exist; start the receiver (or run `topic-audit migrate`) first"
        )
    if not pm.is_registered(screens):
        pm.register(
            screens, name="topic_audit.auditor.screens"
        )  # the auditor's screens (filters, a callback's page)
    guards = sys.modules[__name__]
    if not pm.is_registered(guards):
        pm.register(
            guards, name="topic_audit.auditor.explore"
        )  # fts3_tokenizer() refused on every connection
    metadata = load_metadata(directory)
    access = access_config(host, os.environ if environ is None else environ)
    metadata.setdefault("plugins", {}).update(access.pop("plugins"))
    metadata.update(access)
    ds = Datasette(
        metadata=metadata,
        template_dir=str(directory / "templates"),
        settings={
            "default_page_size": 50,
            "sql_time_limit_ms": 1000,
            "allow_download": False,
            # Suggesting facets runs a query per column: on a log of millions of rows, seconds per page.
            "suggest_facets": False,
        },
    )
    ds.add_database(Database(ds, path=str(db), is_mutable=True), name=DATABASE_NAME)
    return ds
