"""What the commands share: click's context settings and the options several commands take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def checkpoint_file_option(f: Any) -> Any:
    return click.option(
        "--checkpoint-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TOPIC_AUDIT_CHECKPOINT_FILE",
        show_envvar=True,
        help="The signed checkpoint file, outside the database. [default: <db>.checkpoints.jsonl]",
    )(f)


def signing_key_option(f: Any) -> Any:
    return click.option(
        "--signing-key",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TOPIC_AUDIT_SIGNING_KEY",
        show_envvar=True,
        help="Ed25519 key (PEM) that signs checkpoints; created 0600 when absent. "
        "[default: checkpoint-signing.key beside the database]",
    )(f)


def db_option(f: Any) -> Any:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TOPIC_AUDIT_DB",
        default=Path("data/audit.db"),
        show_default=True,
        show_envvar=True,
        help="The SQLite audit database.",
    )(f)


def pinned_key(public_key: str | None) -> str | None:
    """``--public-key`` (raw hex, PEM text, or a PEM file) as raw hex; None when not given."""
    from topic_audit.checkpoints import load_public_key

    if not public_key:
        return None
    text = Path(public_key).read_text() if Path(public_key).is_file() else public_key
    try:
        return load_public_key(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--public-key") from None
