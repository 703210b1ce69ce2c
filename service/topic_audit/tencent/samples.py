"""Tencent-style callbacks: payloads shaped like the documentation's samples, and signed URLs.

Used by ``topic-audit send`` and by the tests. The after-create sample keeps the documentation's quirk:
its ``TopicId`` embeds another group than its ``GroupId``.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Final
from urllib.parse import urlencode

from topic_audit.tencent import models
from topic_audit.tencent.checks import sign

DOC_GROUP: Final = "@TGS#2J4SZEAEL"
DOC_TOPIC: Final = "@TGS#_@TGS#cQVLVHIM62CJ@TOPIC#_@TOPIC#cRTE3HIM62C5"

SAMPLES: Final[dict[str, dict[str, Any]]] = {
    "before-create": {
        "CallbackCommand": models.BEFORE_CREATE,
        "Operator_Account": "leckie",
        "Type": "Community",
        "Name": "MyFirstTopic",
    },
    "after-create": {
        "CallbackCommand": models.AFTER_CREATE,
        "GroupId": DOC_GROUP,
        "TopicId": DOC_TOPIC,
        "Operator_Account": "group_root",
        "Owner_Account": "leckie",
        "Type": "Community",
        "Name": "MyFirstTopic",
        "UserDefinedDataList": [
            {"Key": "UserDefined1", "Value": "hello"},
            {"Key": "UserDefined2", "Value": "world"},
        ],
    },
    "info-changed": {
        "CallbackCommand": models.AFTER_INFO_CHANGED,
        "GroupId": DOC_GROUP,
        "TopicId": DOC_TOPIC,
        "Type": "Community",
        "Operator_Account": "leckie",
        "Notification": "NewNotification",
    },
    "info-changed-without-topic": {
        "CallbackCommand": models.AFTER_INFO_CHANGED,
        "GroupId": DOC_GROUP,
        "Type": "Community",
        "Operator_Account": "leckie",
        "Introduction": "NewIntroduction",
    },
    "destroyed": {
        "CallbackCommand": models.AFTER_DESTROYED,
        "GroupId": DOC_GROUP,
        "Type": "Community",
        "TopicIdList": [DOC_TOPIC],
    },
    "group-created": {
        "CallbackCommand": "Group.CallbackAfterCreateGroup",
        "GroupId": DOC_GROUP,
        "Type": "Community",
        "Operator_Account": "leckie",
        "Owner_Account": "leckie",
        "Name": "MyFirstGroup",
        "MemberList": [{"Member_Account": "leckie"}],
        "EventTime": "1670574414123",
    },
}


def sample(name: str, **changes: Any) -> dict[str, Any]:
    """A fresh copy of the named sample with ``changes`` applied."""
    body = copy.deepcopy(SAMPLES[name])
    body.update(changes)
    return body


def query(
    sdk_app_id: str,
    command: str,
    token: str | None = None,
    now: float | None = None,
    client_ip: str = "203.0.113.7",
    platform: str = "RESTAPI",
) -> str:
    """The query string Tencent sends, signed when a token is given."""
    params = {
        "SdkAppid": sdk_app_id,
        "CallbackCommand": command,
        "contenttype": "json",
        "ClientIP": client_ip,
        "OptPlatform": platform,
    }
    if token is not None:
        request_time = str(int(time.time() if now is None else now))
        params["RequestTime"] = request_time
        params["Sign"] = sign(token, request_time)
    return urlencode(params)
