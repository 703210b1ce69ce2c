"""The checks every callback goes through, in the contract's order; the first failure decides.

:func:`decide` is a pure function of the request as received (and the clock): no I/O, no state. Whether a
topic event is a redelivery depends on the log, so that last step (``accepted`` or ``duplicate``) is
taken by the writer, inside the transaction that appends the row.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

import msgspec

from topic_audit.settings import Settings
from topic_audit.tencent import models

_INTEGER = re.compile(r"[0-9]{1,12}")

HEAD_REFUSED: Final = ("header_timeout", "headers_too_large")
"""Rejections of a request whose head the receiver refused before the checks ran (408, 431)."""
UNAUTHENTICATED: Final = (
    "method_not_allowed",
    "request_timeout",
    "body_too_large",
    "app_id_missing",
    "app_id_mismatch",
    "signature_missing",
    "request_time_skewed",
    "signature_invalid",
)
"""Rejections by the checks up to and including the signature, in the contract's order."""
AUTHENTICATED: Final = ("malformed_json", "command_mismatch", "invalid_payload")
"""Rejections after the signature passed: the app's handler still gets these callbacks."""
REASONS: Final = (*HEAD_REFUSED, *UNAUTHENTICATED, *AUTHENTICATED)
"""Every reason a request is rejected for: the one list (metrics' labels, forwarding's filter)."""
NOT_FORWARDED: Final = frozenset((*HEAD_REFUSED, *UNAUTHENTICATED))
"""The rejections never forwarded (the contract: "every request that passed the app-id and signature
checks, whatever its outcome after them; never one rejected by those checks, never a non-POST"): in the
receiver :attr:`Decision.authenticated` says it of one request; the outbox's SQL filter uses this list
(``tests/test_outbox.py`` holds the two to each other for every reason)."""


@dataclass(frozen=True, slots=True)
class RawRequest:
    """A request to the callback path, exactly as received."""

    method: str
    path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    remote_addr: str | None = None
    declared_length: int | None = None
    body_truncated: bool = False
    """Reading stopped at the body limit: ``body`` holds only the first bytes."""
    timed_out: bool = False
    """The client did not send the whole body in time: ``body`` holds what arrived."""
    client_cert: str | None = None
    """Subject of the TLS client certificate the server verified, when it exposes it."""
    head_bytes: int = 0
    """Bytes of the request head: request line and header fields (as far as the server read it)."""
    header_count: int = 0
    """Header fields in the request head (all of them, also those not kept in ``headers``)."""
    headers_truncated: bool = False
    """``headers`` (and ``query_string``) hold only what fits the limits: the head was too large, or the
    server stopped reading it."""
    head_timed_out: bool = False
    """The head did not arrive in time: the request is what had arrived of it (the server closes)."""


@dataclass(slots=True)
class Decision:
    """What we answer and record. ``event`` is set when the writer must project it."""

    status_code: int
    outcome: str
    reason: str | None = None
    detail: str = ""
    command: str | None = None
    query: Mapping[str, str] = field(default_factory=dict)
    event: models.TopicEvent | None = None
    topic_id: str | None = None
    group_id: str | None = None
    authenticated: bool = False
    """It passed the app-id and signature checks: with forwarding, the app's handler gets it too."""


def sign(token: str, request_time: str) -> str:
    """Tencent's callback signature: lowercase hex SHA-256 of ``token + RequestTime``."""
    return hashlib.sha256((token + request_time).encode()).hexdigest()


def parse_query(query_string: str) -> dict[str, str]:
    """Query parameters; the first of a repeated name wins (the raw string is recorded anyway).

    Tencent's query strings are plain ASCII: they are split directly, and only a string with
    percent-escapes or ``+`` goes through the standard library's decoding.
    """
    if "%" in query_string or "+" in query_string:
        pairs = parse_qsl(query_string, keep_blank_values=True)
    else:
        pairs = [(n, v) for n, _, v in (p.partition("=") for p in query_string.split("&") if p)]
    query: dict[str, str] = {}
    for name, value in pairs:
        query.setdefault(name, value)
    return query


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[Network]) -> str | None:
    """The address recorded as ``remote_addr``: the connection's peer; when the peer is one of your trusted
    ``proxies``, the hop that reached them, read from ``X-Forwarded-For`` (its values) right to left: the
    first address that is not a trusted proxy. A value that is not an address stops the walk at the last
    trusted hop, so nothing but an address your proxies vouch for is ever recorded."""
    if not proxies or peer is None or not forwarded_for or not _trusted(peer, proxies):
        return peer
    hop = peer
    for value in reversed(",".join(forwarded_for).split(",")):
        address = _address(value.strip())
        if address is None:
            return hop
        hop = str(address)
        if not any(address in network for network in proxies):
            return hop
    return hop


def _trusted(peer: str, proxies: Sequence[Network]) -> bool:
    address = _address(peer)
    return address is not None and any(address in network for network in proxies)


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, also written ``1.2.3.4:port`` or ``[v6]:port``; None when it is none."""
    if value.startswith("[") and "]" in value:
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value[:64])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _reject(status: int, reason: str, detail: str, **kwargs: Any) -> Decision:
    return Decision(status, "rejected", reason, detail, **kwargs)


def decide(request: RawRequest, settings: Settings, now: float) -> Decision:
    """Run the checks of the contract's table, in order, and return the decision."""
    query = parse_query(request.query_string)
    command = query.get("CallbackCommand") or None
    common: dict[str, Any] = {"command": command, "query": query}

    if request.head_timed_out:
        return _reject(
            408,
            "header_timeout",
            f"request head not complete within {settings.header_timeout_seconds:g} s "
            f"({request.head_bytes} bytes received)",
            **common,
        )
    if request.head_bytes > settings.max_header_bytes or request.header_count > settings.max_headers:
        return _reject(
            431,
            "headers_too_large",
            f"request head of {request.head_bytes} bytes in {request.header_count} header fields (as far "
            f"as received); limits {settings.max_header_bytes} bytes, {settings.max_headers} fields",
            **common,
        )

    if request.method != "POST":
        return _reject(405, "method_not_allowed", f"{request.method} is not allowed; use POST", **common)

    if request.timed_out:
        return _reject(
            408, "request_timeout", f"body not received within {settings.body_timeout_seconds} s", **common
        )

    limit = settings.max_body_bytes
    if request.declared_length is not None and request.declared_length > limit:
        return _reject(
            413, "body_too_large", f"declared {request.declared_length} bytes, limit {limit}", **common
        )
    if request.body_truncated or len(request.body) > limit:
        return _reject(413, "body_too_large", f"more than {limit} bytes received", **common)

    app_id = query.get("SdkAppid")
    if not app_id:
        return _reject(403, "app_id_missing", "SdkAppid query parameter is absent", **common)
    if not hmac.compare_digest(app_id.encode(), settings.sdk_app_id.encode()):
        return _reject(403, "app_id_mismatch", "SdkAppid is not this app's", **common)

    if settings.token is not None:
        failure = _check_signature(query, settings.token, settings.sign_tolerance_seconds, now)
        if failure is not None:
            return _reject(401, failure[0], failure[1], **common)

    decision = _check_body(request.body, command, query)
    if command == models.BEFORE_CREATE and decision.status_code != 200:
        # A before-callback answered with anything but OK/0 could veto the user's operation.
        decision = Decision(
            200, "ignored", None, f"not vetoed despite {decision.reason}: {decision.detail}", **common
        )
    decision.authenticated = True
    return decision


def _check_signature(
    query: Mapping[str, str], token: str, tolerance: int, now: float
) -> tuple[str, str] | None:
    given = query.get("Sign")
    request_time = query.get("RequestTime")
    if not given or not request_time:
        return "signature_missing", "Sign and RequestTime query parameters are required"
    if not _INTEGER.fullmatch(request_time):
        return "request_time_skewed", "RequestTime is not an integer"
    skew = int(request_time) - int(now)
    if abs(skew) > tolerance:
        return "request_time_skewed", f"RequestTime is {skew:+d} s from now; tolerance {tolerance} s"
    expected = sign(token, request_time).encode()
    if not hmac.compare_digest(expected, given.lower().encode("utf-8", "surrogateescape")):
        return "signature_invalid", "Sign does not match"
    return None


def _check_body(body: bytes, command: str | None, query: Mapping[str, str]) -> Decision:
    common: dict[str, Any] = {"command": command, "query": query}
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        return _reject(400, "malformed_json", str(exc), **common)
    if not isinstance(document, dict):
        return _reject(
            400, "malformed_json", f"body is a JSON {_json_kind(document)}, not an object", **common
        )

    body_command = document.get("CallbackCommand")
    if command is None and isinstance(body_command, str) and body_command:
        command = body_command
        common["command"] = command
    if body_command != command:
        shown = "absent" if body_command is None else repr(body_command)[:120]
        return _reject(
            400, "command_mismatch", f"body CallbackCommand {shown} differs from the query's", **common
        )

    group_id = document.get("GroupId") if isinstance(document.get("GroupId"), str) else None
    payload_type = models.PAYLOAD_TYPES.get(command) if command else None
    if payload_type is None:
        return Decision(
            200, "ignored", None, "not a topic command; recorded only", group_id=group_id, **common
        )

    try:
        event = msgspec.convert(document, payload_type)
    except msgspec.ValidationError as exc:
        return _reject(400, "invalid_payload", str(exc), group_id=group_id, **common)

    if isinstance(event, models.BeforeCreateTopic):
        return Decision(200, "ignored", None, "before-create: recorded, never vetoed", **common)
    if isinstance(event, models.AfterTopicInfoChanged) and event.TopicId is None:
        return Decision(
            200,
            "ignored",
            None,
            "no TopicId in the payload: recorded, not projected",
            group_id=event.GroupId,
            **common,
        )
    topic_id: str | None
    if isinstance(event, models.AfterTopicDestroyed):
        topic_id = event.TopicIdList[0] if len(event.TopicIdList) == 1 else None
    else:
        topic_id = event.TopicId
    return Decision(
        200, "accepted", None, "", event=event, topic_id=topic_id, group_id=event.GroupId, **common
    )


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null"
    )
