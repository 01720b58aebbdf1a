"""The `useragent` transform: the conformance checks of `runner.testing`, and what it
makes of well-known user agents."""

from __future__ import annotations

import copy
import datetime as dt

import fastavro
import pytest

import pipeline_useragent
from pipeline_useragent import UserAgent, parse_user_agent
from runner.testing import check_transform
from runner.transform import Batch, TransformContext

CHROME_WINDOWS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/126.0.0.0 Safari/537.36")
SAFARI_IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                 "Version/17.5 Mobile/15E148 Safari/604.1")
CHROME_ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/126.0.0.0 Mobile Safari/537.36")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"

ADDED = ["browser", "browser_version", "os", "device", "is_bot"]


def _nullable(name: str) -> dict:
    return {"name": name, "type": ["null", "string"], "default": None}


# The access-log record of pipelines/schemas/activity.avsc (what the http_log source yields).
ACTIVITY = {
    "type": "record",
    "name": "Activity",
    "namespace": "pipeline.examples",
    "fields": [
        _nullable("remote_host"), _nullable("ident"), _nullable("user"),
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "request", "type": "string"},
        _nullable("method"), _nullable("path"), _nullable("protocol"),
        {"name": "status", "type": ["null", "int"], "default": None},
        {"name": "bytes", "type": ["null", "long"], "default": None},
        _nullable("referrer"), _nullable("user_agent"),
    ],
}


def activity(n: int, user_agent: str | None) -> dict:
    return {
        "remote_host": f"203.0.113.{n % 250}",
        "ident": None,
        "user": None,
        "timestamp": dt.datetime(2026, 11, 20, 6, 0, n % 60, tzinfo=dt.timezone.utc),
        "request": f"GET /products/{n} HTTP/1.1",
        "method": "GET",
        "path": f"/products/{n}",
        "protocol": "HTTP/1.1",
        "status": 200,
        "bytes": 512 + n,
        "referrer": None,
        "user_agent": user_agent,
    }


AGENTS = [CHROME_WINDOWS, SAFARI_IPHONE, GOOGLEBOT, None, CHROME_ANDROID, BINGBOT, "curl/8.5.0", ""]
RECORDS = [activity(n, AGENTS[n % len(AGENTS)]) for n in range(64)]


def transform(**config) -> UserAgent:
    return UserAgent(UserAgent.Config.parse(config), TransformContext("access-logs", "source", "sources[0].transforms[0]"))


# --- conformance --------------------------------------------------------------------------


def test_conformance_on_a_sink() -> None:
    # On a sink the schema is the topic's (the records as decoded); the output must fit
    # what `schema()` makes of it.
    out = check_transform(UserAgent, {}, records=copy.deepcopy(RECORDS), schema=ACTIVITY, side="sink")
    assert len(out) == len(RECORDS)
    assert [r["is_bot"] for r in out[:8]] == [False, False, True, False, False, True, False, False]


def test_conformance_on_a_source() -> None:
    # On a source the topic's schema declares the records as they leave the chain (as
    # pipelines/schemas/activity-useragent.avsc does).
    topic = {**ACTIVITY, "fields": [*ACTIVITY["fields"], _nullable("browser"), _nullable("browser_version"),
                                    _nullable("os"), _nullable("device"),
                                    {"name": "is_bot", "type": "boolean", "default": False}]}
    out = check_transform(UserAgent, {}, records=copy.deepcopy(RECORDS), schema=topic, side="source")
    assert [(r["browser"], r["device"]) for r in out[:4]] == [
        ("Chrome", None), ("Mobile Safari", "iPhone"), ("Googlebot", "Spider"), (None, None)]


def test_conformance_with_a_prefix_and_another_field() -> None:
    schema = {**ACTIVITY, "fields": [f if f["name"] != "user_agent" else _nullable("ua") for f in ACTIVITY["fields"]]}
    records = [{**{k: v for k, v in r.items() if k != "user_agent"}, "ua": r["user_agent"]} for r in RECORDS]
    out = check_transform(UserAgent, {"field": "ua", "prefix": "ua_"}, records=records, schema=schema)
    assert out[2]["ua_browser"] == "Googlebot" and out[2]["ua_is_bot"] is True
    assert "browser" not in out[0]


# --- known user agents ---------------------------------------------------------------------


def test_chrome_on_windows() -> None:
    assert parse_user_agent(CHROME_WINDOWS) == {
        "browser": "Chrome", "browser_version": "126.0.0.0", "os": "Windows", "device": None, "is_bot": False,
    }


def test_safari_on_iphone() -> None:
    assert parse_user_agent(SAFARI_IPHONE) == {
        "browser": "Mobile Safari", "browser_version": "17.5", "os": "iOS", "device": "iPhone", "is_bot": False,
    }


def test_chrome_on_an_android_phone() -> None:
    fields = parse_user_agent(CHROME_ANDROID)
    assert (fields["browser"], fields["os"], fields["device"], fields["is_bot"]) == ("Chrome Mobile", "Android", "Pixel 8", False)


@pytest.mark.parametrize("ua, family", [(GOOGLEBOT, "Googlebot"), (BINGBOT, "bingbot")])
def test_crawlers_are_bots(ua: str, family: str) -> None:
    fields = parse_user_agent(ua)
    assert fields["browser"] == family and fields["device"] == "Spider" and fields["is_bot"] is True


@pytest.mark.parametrize("ua", [None, "", "-"])
def test_missing_user_agents_give_nulls_and_no_bot(ua: str | None) -> None:
    assert parse_user_agent(ua) == {"browser": None, "browser_version": None, "os": None, "device": None, "is_bot": False}


def test_apply_adds_the_fields_and_keeps_the_record() -> None:
    batch = Batch([activity(1, SAFARI_IPHONE), activity(2, None)], source_offsets={"f": 2}, positions=["f:1", "f:2"])
    out = transform().apply(batch)
    assert out.rows[0]["device"] == "iPhone" and out.rows[0]["request"] == "GET /products/1 HTTP/1.1"
    assert [out.rows[1][k] for k in ADDED] == [None, None, None, None, False]
    assert out.source_offsets == {"f": 2} and out.positions == ["f:1", "f:2"]
    assert "browser" not in batch.rows[0], "the input rows are not modified"


def test_each_distinct_user_agent_is_parsed_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = pipeline_useragent.parse
    monkeypatch.setattr(pipeline_useragent, "parse", lambda ua: calls.append(ua) or real(ua))
    t = transform()
    t.apply(Batch(copy.deepcopy(RECORDS)))
    assert sorted(calls) == sorted(a for a in AGENTS if a)  # null and "" are not parsed at all
    t.apply(Batch(copy.deepcopy(RECORDS[:3])))
    assert len(calls) == len([a for a in AGENTS if a]) + 3  # a new batch parses again (ua-parser caches)


def test_a_user_agent_that_is_no_string_is_a_record_error() -> None:
    rows = [activity(1, CHROME_WINDOWS), {**activity(2, None), "user_agent": 42}, activity(3, GOOGLEBOT)]
    out = transform().apply(Batch(rows, positions=["f:1", "f:2", "f:3"]))
    assert [r["browser"] for r in out.rows] == ["Chrome", "Googlebot"]
    assert out.positions == ["f:1", "f:3"]
    [error] = out.errors
    assert error.stage == "transform" and error.field == "user_agent" and error.position == "f:2"
    assert "useragent" in error.error


# --- schema() ----------------------------------------------------------------------------------


def test_schema_adds_nullable_strings_and_a_boolean() -> None:
    out = transform(prefix="ua_").schema(copy.deepcopy(ACTIVITY))
    added = {f["name"]: f for f in out["fields"][len(ACTIVITY["fields"]):]}
    assert list(added) == [f"ua_{n}" for n in ADDED]
    assert added["ua_browser"]["type"] == ["null", "string"] and added["ua_browser"]["default"] is None
    assert added["ua_is_bot"]["type"] == "boolean" and added["ua_is_bot"]["default"] is False
    fastavro.parse_schema(out)  # valid Avro
    assert len(ACTIVITY["fields"]) == 12, "the input schema is not modified"


def test_schema_without_the_field_is_refused() -> None:
    with pytest.raises(ValueError, match="no field 'agent'"):
        transform(field="agent").schema(copy.deepcopy(ACTIVITY))


def test_schema_with_a_field_that_is_no_string_is_refused() -> None:
    with pytest.raises(ValueError, match="not a string"):
        transform(field="status").schema(copy.deepcopy(ACTIVITY))


def test_schema_replaces_fields_of_the_same_names() -> None:
    # apply overwrites such fields, so schema() declares them as the transform makes them.
    schema = {**ACTIVITY, "fields": [*ACTIVITY["fields"][:3], {"name": "os", "type": "int"}, *ACTIVITY["fields"][3:]]}
    out = transform().schema(copy.deepcopy(schema))
    names = [f["name"] for f in out["fields"]]
    assert names[3] == "os" and out["fields"][3]["type"] == ["null", "string"]
    assert names.count("os") == 1 and names[-4:] == ["browser", "browser_version", "device", "is_bot"]
    fastavro.parse_schema(out)
