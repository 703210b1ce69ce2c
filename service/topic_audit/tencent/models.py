"""The callback payloads, as frozen msgspec structs, and the JSON answer.

Structure is strict (types of every known field, required fields present); sizes are generous sanity
bounds, several times Tencent's documented limits, because Tencent's documentation is inconsistent and
its limits may grow. Unknown fields are allowed: Tencent adds fields without notice.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

# Sanity bounds (characters). Documented limits: TopicId 96 B, GroupId 48 B, UserID 32 B, Name 30 B,
# Introduction 240 B, Notification 300 B, FaceUrl 100 B, custom key 16 B, custom value 512 B.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
Account = Annotated[str, msgspec.Meta(max_length=256)]
Name = Annotated[str, msgspec.Meta(max_length=1024)]
Text = Annotated[str, msgspec.Meta(max_length=8192)]
Url = Annotated[str, msgspec.Meta(max_length=4096)]
CustomKey = Annotated[str, msgspec.Meta(max_length=256)]
CustomValue = Annotated[str, msgspec.Meta(max_length=16384)]
# Group callbacks type EventTime Integer but send strings in their samples: accept both.
EventTime = int | str | None

BEFORE_CREATE: Final = "Group.CallbackBeforeCreateTopic"
AFTER_CREATE: Final = "Group.CallbackAfterCreateTopic"
AFTER_DESTROYED: Final = "Group.CallbackAfterTopicDestroyed"
AFTER_INFO_CHANGED: Final = "Group.CallbackAfterTopicInfoChanged"
TOPIC_COMMANDS: Final = (BEFORE_CREATE, AFTER_CREATE, AFTER_DESTROYED, AFTER_INFO_CHANGED)
GROUP_COMMANDS: Final = (
    "Group.CallbackAfterCreateGroup",
    "Group.CallbackAfterGroupDestroyed",
    "Group.CallbackAfterGroupInfoChanged",
    "Group.CallbackAfterNewMemberJoin",
    "Group.CallbackAfterMemberExit",
    "Group.CallbackAfterSendMsg",
)
# The ``command`` label of the metrics: these, or "other".
KNOWN_COMMANDS: Final = TOPIC_COMMANDS + GROUP_COMMANDS


class UserDefinedData(msgspec.Struct, frozen=True):
    Key: CustomKey
    Value: CustomValue


class BeforeCreateTopic(msgspec.Struct, frozen=True):
    Operator_Account: Account | None = None
    Type: Account | None = None
    Name: Name | None = None
    GroupId: Id | None = None
    EventTime: EventTime = None


class AfterCreateTopic(msgspec.Struct, frozen=True):
    GroupId: Id
    TopicId: Id
    Operator_Account: Account | None = None
    Owner_Account: Account | None = None
    Type: Account | None = None
    Name: Name | None = None
    UserDefinedDataList: list[UserDefinedData] | None = None
    Introduction: Text | None = None
    Notification: Text | None = None
    FaceUrl: Url | None = None
    EventTime: EventTime = None


class AfterTopicDestroyed(msgspec.Struct, frozen=True):
    GroupId: Id
    TopicIdList: Annotated[list[Id], msgspec.Meta(min_length=1, max_length=1000)]
    Type: Account | None = None
    Operator_Account: Account | None = None
    EventTime: EventTime = None


class AfterTopicInfoChanged(msgspec.Struct, frozen=True):
    GroupId: Id
    TopicId: Id | None = None
    Operator_Account: Account | None = None
    Type: Account | None = None
    Name: Name | None = None
    Introduction: Text | None = None
    Notification: Text | None = None
    FaceUrl: Url | None = None
    UserDefinedDataList: list[UserDefinedData] | None = None
    EventTime: EventTime = None


TopicEvent = BeforeCreateTopic | AfterCreateTopic | AfterTopicDestroyed | AfterTopicInfoChanged

PAYLOAD_TYPES: Final[dict[str, type[TopicEvent]]] = {
    BEFORE_CREATE: BeforeCreateTopic,
    AFTER_CREATE: AfterCreateTopic,
    AFTER_DESTROYED: AfterTopicDestroyed,
    AFTER_INFO_CHANGED: AfterTopicInfoChanged,
}


class Answer(msgspec.Struct, frozen=True):
    """The JSON answer Tencent expects; all three fields are required."""

    ActionStatus: str
    ErrorInfo: str
    ErrorCode: int


_encoder = msgspec.json.Encoder()
OK_BODY: Final = _encoder.encode(Answer("OK", "", 0))


def encode_answer(action_status: str, error_info: str, error_code: int) -> bytes:
    return _encoder.encode(Answer(action_status, error_info, error_code))


def answer_body(status_code: int, reason: str | None = None, detail: str = "") -> bytes:
    """The answer's bytes: OK on 200, otherwise FAIL with the HTTP status as ``ErrorCode``."""
    if status_code == 200:
        return OK_BODY
    info = reason or "error"
    if detail:
        info = f"{info}: {detail}"
    return _encoder.encode(Answer("FAIL", info, status_code))


def custom_data(items: list[UserDefinedData] | None) -> dict[str, str] | None:
    """``UserDefinedDataList`` as a JSON object (later keys win), or None when absent."""
    if items is None:
        return None
    return {item.Key: item.Value for item in items}
