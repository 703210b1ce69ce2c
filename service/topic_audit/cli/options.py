"""What the commands share: click's context settings and the options several commands take."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

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
        help="Ed25519 key (PEM) that signs checkpoints; created 0600 when absent, refused when group or "
        "others may read or write it. [default: outside the data folder, <folder>-keys/<db name>.signing.key "
        "(data-keys/audit.db.signing.key); an existing checkpoint-signing.key beside the database is still "
        "used, with a warning]",
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


def origin_options(f: Any) -> Any:
    """``--log-origin`` and ``--sdkappid``, which name the transparency log (see :func:`log_origin`)."""
    f = click.option(
        "--sdkappid",
        envvar="TOPIC_AUDIT_SDKAPPID",
        show_envvar=True,
        help="The app's SDKAppID: the log's origin is topic-audit/<SdkAppid> unless --log-origin is given.",
    )(f)
    return click.option(
        "--log-origin",
        envvar="TOPIC_AUDIT_LOG_ORIGIN",
        show_envvar=True,
        help="The transparency log's origin (first line of each signed checkpoint note, and its key name). "
        "[default: topic-audit/<SdkAppid>]",
    )(f)


def log_origin(log_origin: str | None, sdkappid: str | None) -> str | None:
    """The origin those options name; None when neither is given."""
    from topic_audit.settings import Settings

    if not log_origin and not sdkappid:
        return None
    return Settings(sdk_app_id=sdkappid or "", log_origin=log_origin).log_origin_name


def pinned_key(public_key: str | None) -> str | None:
    """``--public-key`` (raw hex, PEM text, or a PEM file) as raw hex; None when not given."""
    from topic_audit.transparency.checkpoints import load_public_key

    if not public_key:
        return None
    text = Path(public_key).read_text() if Path(public_key).is_file() else public_key
    try:
        return load_public_key(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--public-key") from None


def forward_url_option(help_text: str) -> Callable[[F], F]:
    """``--forward-url`` (``TOPIC_AUDIT_FORWARD_URL``; repeat it, or space-separate in the variable)."""
    return click.option(
        "--forward-url", multiple=True, envvar="TOPIC_AUDIT_FORWARD_URL", show_envvar=True, help=help_text
    )


def _schedule(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    from topic_audit.settings import SettingsError, parse_schedule

    try:
        return parse_schedule(value)
    except SettingsError as exc:
        raise click.BadParameter(str(exc)) from None


def retry_schedule_option(f: Any) -> Any:
    """``--forward-retry-schedule`` (``TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE``), parsed to seconds."""
    from topic_audit.settings import Settings

    return click.option(
        "--forward-retry-schedule",
        default=",".join(str(s) for s in Settings().forward_retry_schedule),
        show_default=True,
        envvar="TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE",
        show_envvar=True,
        callback=_schedule,
        help="Seconds before each attempt of an after-callback (the first after receipt); after the last, the "
        "delivery is failed (topic-audit replay --failed).",
    )(f)
