"""The topics projection: the documented sample field by field, each command's effect, redelivery."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Post, random_history, rows, topics
from topic_audit.log import projection, rebuild
from topic_audit.settings import Settings
from topic_audit.tencent import models, samples

TOPIC = samples.DOC_TOPIC


def test_documented_create_sample_is_projected_field_by_field(post: Post, settings: Settings) -> None:
    post(samples.sample("after-create"))
    [entry] = rows(settings.db)
    topic = topics(settings.db)[TOPIC]
    assert topic == {
        "topic_id": TOPIC,
        "group_id": "@TGS#2J4SZEAEL",
        "name": "MyFirstTopic",
        "type": "Community",
        "owner_account": "leckie",
        "operator_account": "group_root",
        "custom_data": '{"UserDefined1":"hello","UserDefined2":"world"}',
        "introduction": None,
        "notification": None,
        "face_url": None,
        "created_at": entry["received_at"],
        "created_entry_id": entry["id"],
        "updated_at": entry["received_at"],
        "updated_entry_id": entry["id"],
        "deleted_at": None,
        "deleted_entry_id": None,
    }
    assert (entry["outcome"], entry["topic_id"], entry["group_id"]) == ("accepted", TOPIC, "@TGS#2J4SZEAEL")


def test_create_without_custom_fields_leaves_custom_data_null(post: Post, settings: Settings) -> None:
    body = samples.sample("after-create")
    del body["UserDefinedDataList"]
    post(body)
    assert topics(settings.db)[TOPIC]["custom_data"] is None


def test_info_change_updates_only_the_changed_fields(post: Post, settings: Settings) -> None:
    post(samples.sample("after-create"))
    post(samples.sample("info-changed", Name="Renamed", FaceUrl="https://example.com/a.png"))
    change = rows(settings.db)[-1]
    topic = topics(settings.db)[TOPIC]
    assert (topic["name"], topic["face_url"], topic["owner_account"]) == (
        "Renamed",
        "https://example.com/a.png",
        "leckie",
    )
    assert topic["notification"] == "NewNotification"
    assert topic["operator_account"] == "leckie"
    assert (topic["updated_entry_id"], topic["created_entry_id"]) == (change["id"], 1)


def test_info_change_merges_custom_data(post: Post, settings: Settings) -> None:
    post(samples.sample("after-create"))
    post(samples.sample("info-changed", UserDefinedDataList=[{"Key": "UserDefined2", "Value": "there"}]))
    assert json.loads(topics(settings.db)[TOPIC]["custom_data"]) == {
        "UserDefined1": "hello",
        "UserDefined2": "there",
    }


def test_destroy_marks_every_listed_topic_deleted(post: Post, settings: Settings) -> None:
    for suffix in ("a", "b"):
        post(samples.sample("after-create", TopicId=TOPIC + suffix))
    post(samples.sample("destroyed", TopicIdList=[TOPIC + "a", TOPIC + "b"]))
    destroy = rows(settings.db)[-1]
    assert destroy["outcome"] == "accepted" and destroy["topic_id"] is None
    for suffix in ("a", "b"):
        topic = topics(settings.db)[TOPIC + suffix]
        assert (topic["deleted_entry_id"], topic["deleted_at"]) == (destroy["id"], destroy["received_at"])
        assert topic["name"] == "MyFirstTopic"


def test_before_create_changes_nothing(post: Post, settings: Settings) -> None:
    post(samples.sample("before-create"))
    assert topics(settings.db) == {}


def test_info_change_without_topic_id_is_recorded_not_projected(post: Post, settings: Settings) -> None:
    post(samples.sample("info-changed-without-topic"))
    [entry] = rows(settings.db)
    assert (entry["status_code"], entry["outcome"]) == (200, "ignored")
    assert "no TopicId" in entry["detail"]
    assert topics(settings.db) == {}


@pytest.mark.parametrize("name", ["after-create", "info-changed", "destroyed"])
def test_redelivery_is_a_duplicate_of_the_first(post: Post, settings: Settings, name: str) -> None:
    if name != "after-create":
        post(samples.sample("after-create"))
    body = samples.sample(name)
    post(body)
    before = topics(settings.db)
    response = post(body)  # the same event again, freshly signed as Tencent's retry would be
    assert response.status_code == 200 and response.json()["ActionStatus"] == "OK"
    first, again = rows(settings.db)[-2:]
    assert (first["outcome"], again["outcome"]) == ("accepted", "duplicate")
    assert again["duplicate_of"] == first["id"]
    assert topics(settings.db) == before


def test_a_change_back_to_an_earlier_value_is_not_a_duplicate(post: Post, settings: Settings) -> None:
    post(samples.sample("after-create"))
    for name in ("A", "B", "A"):
        post(samples.sample("info-changed", Name=name))
    assert [r["outcome"] for r in rows(settings.db)] == ["accepted"] * 4
    assert topics(settings.db)[TOPIC]["name"] == "A"


def test_create_after_destroy_is_a_duplicate(post: Post, settings: Settings) -> None:
    post(samples.sample("after-create"))
    post(samples.sample("destroyed"))
    post(samples.sample("after-create"))
    assert rows(settings.db)[-1]["outcome"] == "duplicate"
    assert topics(settings.db)[TOPIC]["deleted_entry_id"] == 2


def test_events_for_topics_never_seen(post: Post, settings: Settings) -> None:
    post(samples.sample("destroyed", TopicIdList=["old-topic"]))
    post(samples.sample("info-changed", TopicId="older-topic", Name="Named later"))
    state = topics(settings.db)
    assert state["old-topic"]["deleted_entry_id"] == 1 and state["old-topic"]["created_entry_id"] is None
    assert state["old-topic"]["group_id"] == samples.DOC_GROUP
    assert state["older-topic"]["name"] == "Named later"
    assert [r["outcome"] for r in rows(settings.db)] == ["accepted", "accepted"]


def test_create_delivered_after_a_change_keeps_the_newer_values(post: Post, settings: Settings) -> None:
    post(samples.sample("info-changed", Name="Newer"))
    post(samples.sample("after-create"))
    topic = topics(settings.db)[TOPIC]
    assert (topic["name"], topic["owner_account"], topic["created_entry_id"], topic["updated_entry_id"]) == (
        "Newer",
        "leckie",
        2,
        1,
    )


def test_rebuild_reproduces_the_live_projection(post: Post, settings: Settings) -> None:
    random_history(post, random.Random(7), 300)
    live = topics(settings.db)
    outcomes = {r["outcome"] for r in rows(settings.db)}
    assert {"accepted", "duplicate", "ignored"} <= outcomes
    conn = sqlite3.connect(settings.db, isolation_level=None)
    try:
        assert rebuild.rebuild(conn).topics == len(live)
    finally:
        conn.close()
    assert topics(settings.db) == live


def test_replay_matches_every_recorded_outcome(post: Post, settings: Settings) -> None:
    random_history(post, random.Random(11), 150)
    conn = sqlite3.connect(settings.db)
    try:
        _, mismatches, _ = projection.replay(conn)
    finally:
        conn.close()
    assert mismatches == []


def test_project_is_pure(tmp_path: Path) -> None:
    event = models.AfterCreateTopic(GroupId="g", TopicId="t", Name="n")
    lookup_calls: list[str] = []

    def lookup(topic_id: str) -> tuple[dict[str, Any] | None, str | None]:
        lookup_calls.append(topic_id)
        return None, None

    first = projection.project(event, 1, "2026-01-01T00:00:00.000Z", "x", lookup)
    second = projection.project(event, 1, "2026-01-01T00:00:00.000Z", "x", lookup)
    assert first == second and lookup_calls == ["t", "t"]
