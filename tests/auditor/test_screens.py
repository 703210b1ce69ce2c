"""The auditor's screens' helpers (topic_audit.auditor.screens): readable values, list cells, a callback's topics."""

from __future__ import annotations

import pytest
from markupsafe import Markup
from topic_audit.auditor import screens


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('{"b":1,"a":{"x":"é"}}', '{\n  "b": 1,\n  "a": {\n    "x": "é"\n  }\n}'),
        (b'["a"]', '[\n  "a"\n]'),
        ("not json {", "not json {"),
        ("42", "42"),
        (None, ""),
        (b"\xff\xfe", "<2 bytes, not UTF-8>"),
    ],
)
def test_pretty_json_indents_objects_and_leaves_the_rest(value: object, shown: str) -> None:
    assert screens.pretty_json(value) == shown


def test_json_items_and_query_params() -> None:
    assert screens.json_items('{"host":"h","x-n":[1]}') == [("host", "h"), ("x-n", "[1]")]
    assert (
        screens.json_items("[1]") == [] and screens.json_items("{") == [] and screens.json_items(None) == []
    )
    assert screens.query_params("SdkAppid=1&Sign=a%2Bb&empty=") == [
        ("SdkAppid", "1"),
        ("Sign", "a+b"),
        ("empty", ""),
    ]


def cell(raw: object, value: object = None, column: str = "request_body") -> dict[str, object]:
    return {"column": column, "raw": raw, "value": raw if value is None else value, "value_type": "str"}


def test_a_long_list_cell_is_shortened_to_a_link_to_the_field() -> None:
    long = '{"Name": "<script>alert(1)</script>' + "x" * 100 + '"}'
    shown = screens.list_cell(cell(long), "/audit/audit_log/7")
    assert shown.startswith('<a class="shortened" href="/audit/audit_log/7#request_body"')
    assert "<script>" not in shown and "&lt;script&gt;" in shown  # escaped, in the text and the tooltip
    text = shown.split('">', 1)[1].removesuffix("</a>")
    assert text.endswith("\u2026") and len(Markup(text).unescape()) == screens.SHORT_CELL + 1
    assert screens.list_cell(cell(long)).startswith('<span class="shortened"')  # no row page (a view)


def test_short_cells_links_and_blobs_are_left_as_datasette_renders_them() -> None:
    assert screens.list_cell(cell("200")) == "200"
    assert screens.list_cell(cell("<b>")) == "&lt;b&gt;"
    link = Markup('<a href="/audit/topics/t">name</a>')
    assert screens.list_cell(cell("t" * 80, link)) == link
    assert screens.list_cell(cell(b"\x00" * 80, Markup("<a>blob</a>"))) == "<a>blob</a>"
    assert 'title="a value of twenty chars"' in screens.list_cell(cell("a value of twenty chars"))


def test_row_link_reads_datasettes_link_cell() -> None:
    row = [{"column": "id", "value_type": "pk", "value": Markup('<a href="/audit/x/3">3</a>')}]
    assert screens.row_link(row) == "/audit/x/3"
    assert screens.row_link([{"column": "n", "value_type": "int", "value": 1}]) is None


@pytest.mark.parametrize(
    ("topic_id", "body", "topics"),
    [
        ("t1", b'{"TopicIdList": ["t2"]}', ["t1"]),
        (None, b'{"TopicIdList": ["t2", "t3", 4]}', ["t2", "t3"]),
        (None, "{", []),
        (None, None, []),
        (None, '{"TopicIdList": "t2"}', []),
    ],
)
def test_the_topics_of_an_entry(topic_id: str | None, body: object, topics: list[str]) -> None:
    assert screens.topics_of(topic_id, body) == topics
