"""The intake on NATS JetStream, as both roles see it: the connection, the streams, the lease's bucket.

- Receivers publish to **two intake streams** (``TOPIC_AUDIT_INTAKE_A`` and ``_B``, three replicas each,
  their leaders kept on different servers by the active writer). A stream whose leader dies takes
  JetStream's election (4-9 s, fixed in the server) to accept writes again; a receiver whose publish is not
  acknowledged in :data:`TRY_SECONDS` publishes the same message (the same ``Nats-Msg-Id``) to the other.
- The writer applies **both streams** (:mod:`.applier`). A message in doubt (a first try that timed out
  yet was stored) reaches it twice; the writer records the second copy without appending it
  (:class:`topic_audit.writer.requests.Intake`). No third stream sources the two into one order: a
  sourcing stream stalls for tens of seconds after its leader moves, and would be one more thing to
  fail.
- The writer lease is a key in the key-value bucket ``topic_audit_writer`` (:mod:`.lease`).

What an acknowledgement means on disk is the servers' setting, not ours: with ``sync_interval: always``
(nats-server 2.10 and later) each replica has synced the message before the quorum acknowledges it;
with the default, it is in the page cache of a quorum and synced within two minutes (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Final

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from topic_audit.metrics import INTAKE_STREAMS
from topic_audit.settings import Settings

log = logging.getLogger("topic_audit.cluster")

SUBJECTS: Final = ("topic_audit.intake.a", "topic_audit.intake.b")
"""The subjects of :data:`INTAKE_STREAMS`, in the same order."""
LEASE_BUCKET: Final = "topic_audit_writer"
REPLICAS: Final = 3
DUPLICATE_WINDOW_SECONDS: Final = 120.0
"""JetStream drops a second publish of the same message id to the same stream within this window."""
TRY_SECONDS: Final = 0.25
"""How long a receiver waits for one stream's acknowledgement before trying the other."""


def writer_name() -> str:
    """This process, as the lease and the metrics name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def connect(settings: Settings, name: str) -> Client:
    """A connection to the cluster that reconnects for ever (to any of its servers) on its own."""
    credentials: dict[str, str] = {}
    if settings.nats_credentials is not None:  # a .creds file (a JWT and its seed), or an nkey seed alone
        path = str(settings.nats_credentials)
        jwt = b"BEGIN NATS USER JWT" in settings.nats_credentials.read_bytes()
        credentials = {"user_credentials": path} if jwt else {"nkeys_seed": path}
    return await nats.connect(
        servers=list(settings.nats_url),
        name=name,
        **credentials,
        connect_timeout=2,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        ping_interval=5,
        max_outstanding_pings=2,
    )


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The two intake streams."""
    return [
        StreamConfig(
            name=name,
            subjects=[subject],
            num_replicas=REPLICAS,
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=settings.intake_days * 86400,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        for name, subject in zip(INTAKE_STREAMS, SUBJECTS, strict=True)
    ]


async def ensure(js: JetStreamContext, settings: Settings) -> None:
    """Create the streams and the lease's bucket, or bring the streams' settings up to date (the
    writer's job: receivers need no right to change them). The bucket keeps the time to live it was made
    with: every writer's lease uses the bucket's (:class:`topic_audit.cluster.writer.Role`)."""
    for config in stream_configs(settings):
        try:
            await js.stream_info(config.name or "")
        except NotFoundError:
            await js.add_stream(config)
            log.info("created the stream %s (%d replicas)", config.name, REPLICAS)
            continue
        try:
            await js.update_stream(config)
        except BadRequestError as exc:
            log.warning("the stream %s keeps its settings: %s", config.name, exc)
    try:
        await js.key_value(LEASE_BUCKET)
    except Exception:  # nats-py raises BucketNotFoundError, or NotFoundError on older servers
        await js.create_key_value(
            KeyValueConfig(
                bucket=LEASE_BUCKET,
                ttl=settings.lease_seconds,
                replicas=REPLICAS,
                storage=StorageType.FILE,
                history=1,
            )
        )
        log.info("created the key-value bucket %s (ttl %.0f s)", LEASE_BUCKET, settings.lease_seconds)


APART_EVERY_SECONDS: Final = 5.0


async def keep_leaders_apart(nc: Client, js: JetStreamContext) -> None:
    """Keep the two intake streams' leaders on different servers (the active writer's job): a receiver
    whose first stream lost its leader publishes to the other at once, which helps only when the other's
    leader is elsewhere. When they share a server, the second steps down and its replicas elect another
    (JetStream never elects the one that stepped down)."""
    while True:
        await asyncio.sleep(APART_EVERY_SECONDS)
        try:
            leaders = [(await js.stream_info(name)).cluster for name in INTAKE_STREAMS]
            first, second = (c.leader if c is not None else None for c in leaders)
            if first and first == second:
                log.info("the intake streams are both led by %s: %s steps down", first, INTAKE_STREAMS[1])
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{INTAKE_STREAMS[1]}", b"", timeout=2)
        except Exception as exc:  # no quorum now: try again later
            log.debug("the intake streams' leaders could not be checked: %s", exc)
