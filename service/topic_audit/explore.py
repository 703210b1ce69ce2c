"""Datasette over the live audit database, served as ``audit`` (read-only, never immutable).

Reads go through ``mode=ro`` connections while the receiver writes (WAL), so auditors always see the
newest committed rows. The configuration lives in ``dashboard/`` (metadata and templates), shipped inside
the package as ``topic_audit.dashboard`` and found with :mod:`importlib.resources`, so an installed wheel
needs nothing from the source tree; :mod:`topic_audit.screens` is registered as a plugin for what the
templates need beyond Datasette's own context.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from datasette.app import Datasette
from datasette.database import Database
from datasette.plugins import pm

from topic_audit import screens

DASHBOARD = Path(str(resources.files("topic_audit.dashboard")))
"""Datasette's metadata and templates: ``dashboard/`` in the tree, ``topic_audit/dashboard`` when installed."""
DATABASE_NAME = screens.DATABASE_NAME


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        pm.register(screens, name="topic_audit.screens")  # the auditor's screens (filters, a callback's page)
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
