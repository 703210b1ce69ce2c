"""Datasette over the live audit database, served as ``audit`` (read-only, never immutable).

Reads go through ``mode=ro`` connections while the receiver writes (WAL), so auditors always see the
newest committed rows. The configuration lives in ``dashboard/``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml
from datasette.app import Datasette
from datasette.database import Database

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboard"
DATABASE_NAME = "audit"


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


def make_datasette(db: Path, directory: Path = DASHBOARD) -> Datasette:
    """A Datasette instance serving ``db`` as ``audit`` with the metadata in ``directory``."""
    if not db.exists():
        raise FileNotFoundError(
            f"{db} does not exist; start the receiver (or run `topic-audit migrate`) first"
        )
    ds = Datasette(
        metadata=load_metadata(directory),
        settings={"default_page_size": 50, "sql_time_limit_ms": 1000, "allow_download": False},
    )
    ds.add_database(Database(ds, path=str(db), is_mutable=True), name=DATABASE_NAME)
    return ds
