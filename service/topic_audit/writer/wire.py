"""What receivers and the writer process say to each other over the writer's Unix socket.

Every message is a frame: its length (4 bytes, little-endian) and a MessagePack body (msgspec). A
receiver sends requests, each with a sequence number of its own; the writer answers each, in the order it
committed them, with the same number:

- :class:`AppendMessage`: a log row, the decoded topic event (its MessagePack form, decoded again as the
  type its command names), and what forwarding queues with it (:class:`~topic_audit.writer.append.Forward`);
  answered with a :class:`~topic_audit.writer.append.Committed` once the row's COMMIT has returned.
- :class:`RecordMessage`: delivery attempts to record (the delivery process's), committed in a group
  with the rows like an append; answered with the attempts that exhausted their schedule.
- :class:`JobMessage`: a writer job (:mod:`topic_audit.writer.jobs`, by class name); answered with its result.

A receiver's first message is :class:`Hello` with the :data:`VERSION` of the protocol it speaks: a writer
started from other code (a crashed writer restarted after an upgrade, before the receivers were
reloaded) refuses it, and the receiver answers 503 rather than misread the other's frames.

A :class:`Reply` carries ``OK`` and the result, ``REFUSED`` and why (the request could not be committed:
answer 503), or ``FAILED`` and why (a job raised). Plain data only, as the append transaction and the
jobs take it (:mod:`topic_audit.writer.append`, :mod:`topic_audit.writer.jobs`); nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import msgspec

from topic_audit.forwarding import outbox
from topic_audit.log import database
from topic_audit.tencent import models
from topic_audit.writer import jobs
from topic_audit.writer.requests import Append, Committed, Forward, Record

HEADER: Final = 4
"""Bytes of a frame's length prefix."""
MAX_FRAME: Final = 64 * 1024 * 1024
"""A longer frame is a broken peer, not a message (a row is at most a body of a few MB)."""

VERSION: Final = 2
"""Of this protocol: changed with any change to the messages below."""
OK: Final = 0
REFUSED: Final = 1
FAILED: Final = 2
NIL: Final = msgspec.Raw(b"\xc0")

JOBS: Final[dict[str, type[jobs.Job[Any]]]] = {
    cls.__name__: cls
    for cls in (jobs.Counts, jobs.Heartbeat, jobs.Checkpoint, jobs.Pragmas, jobs.Erase, jobs.Purge)
}
"""The jobs a receiver may send, by name."""
RESULTS: Final[dict[str, Any]] = {
    "Counts": jobs.Counted,
    "Heartbeat": None,
    "Checkpoint": dict[str, Any] | None,
    "Pragmas": database.Durability,
    "Erase": tuple[int, bool],
    "Purge": bool,
}
"""The type of each job's result, as the receiver decodes it."""


class AppendMessage(msgspec.Struct, array_like=True, tag=1):
    seq: int
    row: dict[str, Any]
    event: msgspec.Raw
    """The event's MessagePack form, or nil (:data:`NIL`) without one."""
    forward: Forward | None = None


class RecordMessage(msgspec.Struct, array_like=True, tag=4):
    seq: int
    attempts: list[outbox.Attempt]
    schedule: tuple[int, ...]


class JobMessage(msgspec.Struct, array_like=True, tag=2):
    seq: int
    name: str
    job: msgspec.Raw


class Hello(msgspec.Struct, array_like=True, tag=3):
    version: int


class Reply(msgspec.Struct, array_like=True):
    seq: int
    status: int
    value: msgspec.Raw


class ProtocolError(Exception):
    """A frame that is not a message of this protocol."""


def _enc_hook(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot send a {type(obj).__name__} to the writer")


def _dec_hook(kind: type, obj: object) -> object:
    if kind is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError(f"cannot read a {kind} from the writer")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_requests = msgspec.msgpack.Decoder(AppendMessage | RecordMessage | JobMessage | Hello)
_replies = msgspec.msgpack.Decoder(Reply)
_events = {command: msgspec.msgpack.Decoder(kind) for command, kind in models.PAYLOAD_TYPES.items()}
_jobs = {name: msgspec.msgpack.Decoder(kind, dec_hook=_dec_hook) for name, kind in JOBS.items()}
_committed = msgspec.msgpack.Decoder(Committed)
_exhausted = msgspec.msgpack.Decoder(list[outbox.Attempt])
_results = {name: msgspec.msgpack.Decoder(kind) for name, kind in RESULTS.items()}


def frame(message: object) -> bytes:
    """``message`` as one frame."""
    body = _encoder.encode(message)
    return len(body).to_bytes(HEADER, "little") + body


def frames(buffer: bytearray) -> list[bytes]:
    """The whole frames at the start of ``buffer`` (their bodies), removed from it; a partial frame stays."""
    found: list[bytes] = []
    at, end = 0, len(buffer)
    while end - at >= HEADER:
        size = int.from_bytes(buffer[at : at + HEADER], "little")
        if size > MAX_FRAME:
            raise ProtocolError(f"a frame of {size} bytes")
        if end - at - HEADER < size:
            break
        found.append(bytes(buffer[at + HEADER : at + HEADER + size]))
        at += HEADER + size
    if at:
        del buffer[:at]
    return found


# -- the receiver's side ---------------------------------------------------------------------------
def append_frame(
    seq: int, row: dict[str, Any], event: models.TopicEvent | None, forward: Forward | None
) -> bytes:
    raw = NIL if event is None else msgspec.Raw(_encoder.encode(event))
    return frame(AppendMessage(seq, row, raw, forward))


def record_frame(seq: int, attempts: list[outbox.Attempt], schedule: tuple[int, ...]) -> bytes:
    return frame(RecordMessage(seq, attempts, schedule))


def job_frame(seq: int, job: jobs.Job[Any]) -> bytes:
    name = type(job).__name__
    if name not in JOBS:
        raise TypeError(f"the writer process has no job {name}")
    return frame(JobMessage(seq, name, msgspec.Raw(_encoder.encode(job))))


def hello() -> bytes:
    return frame(Hello(VERSION))


def reply(body: bytes) -> Reply:
    try:
        return _replies.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(str(exc)) from exc


def committed(value: msgspec.Raw) -> Committed:
    try:
        return _committed.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"an answer that is not a commit: {exc}") from exc


def exhausted(value: msgspec.Raw) -> list[outbox.Attempt]:
    try:
        return _exhausted.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"an answer that is not a record's: {exc}") from exc


def result(name: str, value: msgspec.Raw) -> Any:
    try:
        return _results[name].decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"an answer that is not the result of {name}: {exc}") from exc


def reason(value: msgspec.Raw) -> str:
    try:
        return str(msgspec.msgpack.decode(value))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"an answer that is not a reason: {exc}") from exc


# -- the writer's side -----------------------------------------------------------------------------
def request(body: bytes) -> tuple[int, Append | Record | jobs.Job[Any] | Hello]:
    """The sequence number and the request of a frame (:class:`ProtocolError` if it is none); a
    :class:`Hello` has the number 0."""
    try:
        message = _requests.decode(body)
        if isinstance(message, Hello):
            return 0, message
        if isinstance(message, RecordMessage):
            return message.seq, Record(message.attempts, message.schedule)
        if isinstance(message, AppendMessage):
            event = None
            if bytes(message.event) != b"\xc0":
                command = message.row.get("callback_command")
                if command not in _events:
                    raise ProtocolError(f"an event for the command {command!r}")
                event = _events[command].decode(message.event)
            return message.seq, Append(message.row, event, message.forward)
        if message.name not in _jobs:
            raise ProtocolError(f"no job {message.name!r}")
        return message.seq, _jobs[message.name].decode(message.job)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(str(exc)) from exc


def answer(seq: int, status: int, value: object) -> bytes:
    """The reply frame to request ``seq``: ``value`` is the result, or why not (a string)."""
    return frame(Reply(seq, status, msgspec.Raw(_encoder.encode(value))))
