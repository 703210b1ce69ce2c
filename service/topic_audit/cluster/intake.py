"""One intake message: what a receiver publishes and the writer applies.

The log row the receiver built (every column but the id and the chain links), the decoded topic event
(its MessagePack form, decoded again as the type its command names), what forwarding queues with it, and
the content's salt: everything the writer needs to append exactly the entry the single-machine writer
would have, and nothing it must look up elsewhere. MessagePack (msgspec), versioned: a writer refuses
a message of a version it does not know rather than misread it.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from topic_audit.forwarding.outbox import Forward
from topic_audit.tencent import models

VERSION: Final = 1
NIL: Final = msgspec.Raw(b"\xc0")


class Message(msgspec.Struct, array_like=True):
    version: int
    row: dict[str, Any]
    event: msgspec.Raw
    forward: Forward | None
    salt: bytes


class NotAMessage(Exception):
    """Bytes that are not an intake message of this version."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_events = {command: msgspec.msgpack.Decoder(kind) for command, kind in models.PAYLOAD_TYPES.items()}


def encode(
    row: dict[str, Any], event: models.TopicEvent | None, forward: Forward | None, salt: bytes
) -> bytes:
    raw = NIL if event is None else msgspec.Raw(_encoder.encode(event))
    return _encoder.encode(Message(VERSION, row, raw, forward, salt))


def decode(data: bytes) -> tuple[dict[str, Any], models.TopicEvent | None, Forward | None, bytes]:
    """The row, event, forwarding and salt of a message; :class:`NotAMessage` if it is none."""
    try:
        message = _decoder.decode(data)
        if message.version != VERSION:
            raise NotAMessage(f"an intake message of version {message.version} (this writer reads {VERSION})")
        event = None
        if bytes(message.event) != b"\xc0":
            command = message.row.get("callback_command")
            if command not in _events:
                raise NotAMessage(f"an event for the command {command!r}")
            event = _events[command].decode(message.event)
        return message.row, event, message.forward, message.salt
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise NotAMessage(str(exc)) from exc
