"""The usage store on real databases (SQLite and PostgreSQL): OpenAI's usage pages with exact figures."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest

from helpers import free_port
from raylm import errors
from raylm.contract import UsageRecord
from raylm.serve.usage.store import UsageQuery, UsageStore, parse_query

DAY, HOUR = 86400, 3600
T0 = 1_699_920_000  # 2023-11-14 00:00 UTC


def rec(t: float, tenant: str = "a", key: str = "ka", model: str = "llama", adapter: str = "",
        route: str = "chat", prompt: int = 0, cached: int = 0, completion: int = 0, batch: bool = False,
        status: int = 200) -> UsageRecord:
    return UsageRecord(time=t, request_id=f"req-{t}", tenant=tenant, key_id=key, model=model, adapter=adapter,
                       route=route, status=status, error_code="" if status == 200 else "rate_limit_exceeded",
                       prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion, batch=batch)


RECORDS = [
    # day 0
    rec(T0 + 100, prompt=10, completion=5),
    rec(T0 + 200, adapter="llama-sql", route="completions", prompt=20, cached=8, completion=7),
    rec(T0 + 300, tenant="b", key="kb", route="responses", prompt=30, completion=9, batch=True),
    rec(T0 + 400, model="", status=429),  # refused before the engine: no tokens, no model request
    rec(T0 + 500, model="mini", route="embeddings", prompt=4),
    # day 1: nothing
    # day 2
    rec(T0 + 2 * DAY + 10, tenant="b", key="kb", route="messages", prompt=100, cached=50, completion=1),
    rec(T0 + 2 * DAY + 86399.9, prompt=1, completion=1),  # 100 ms before day 3
    rec(T0 + 2 * DAY + 20, tenant="b", key="kb", model="mini", route="score", prompt=6),
    # day 3: past the queries' end_time (exclusive)
    rec(T0 + 3 * DAY, route="completions", prompt=1000),
]


def completions(input_tokens: int, output_tokens: int, cached: int, requests: int, **groups: Any) -> dict:
    return {"object": "organization.usage.completions.result", "input_tokens": input_tokens,
            "output_tokens": output_tokens, "input_cached_tokens": cached, "input_audio_tokens": 0,
            "output_audio_tokens": 0, "num_model_requests": requests, "project_id": None, "user_id": None,
            "api_key_id": None, "model": None, "batch": None, "service_tier": None, **groups}


def embeddings(input_tokens: int, requests: int, **groups: Any) -> dict:
    return {"object": "organization.usage.embeddings.result", "input_tokens": input_tokens,
            "num_model_requests": requests, "project_id": None, "user_id": None, "api_key_id": None,
            "model": None, **groups}


def results(page: dict) -> list[list[dict]]:
    return [bucket["results"] for bucket in page["data"]]


@pytest.fixture
def store(db_url):
    s = UsageStore(db_url)
    s.write(RECORDS)
    yield s
    s.close()


def query(kind: str = "completions", tenant: str | None = None, **params: Any) -> UsageQuery:
    return parse_query(kind, {"start_time": str(T0), "end_time": str(T0 + 3 * DAY), **params}, tenant)  # type: ignore


def test_daily_buckets_follow_each_other_empty_ones_included(store):
    page = store.usage(query())
    assert [(b["object"], b["start_time"], b["end_time"]) for b in page["data"]] == [
        ("bucket", T0, T0 + DAY), ("bucket", T0 + DAY, T0 + 2 * DAY), ("bucket", T0 + 2 * DAY, T0 + 3 * DAY)]
    assert results(page) == [[completions(60, 21, 8, 3)], [], [completions(101, 2, 50, 2)]]
    assert (page["object"], page["has_more"], page["next_page"]) == ("page", False, None)


def test_group_by_model_names_the_adapter(store):
    assert results(store.usage(query(group_by="model")))[0] == [
        completions(40, 14, 0, 2, model="llama"), completions(20, 7, 8, 1, model="llama-sql")]


def test_group_by_key_and_project_and_batch(store):
    page = store.usage(query(group_by=["api_key_id", "project_id"]))
    assert results(page)[0] == [completions(30, 12, 8, 2, api_key_id="ka", project_id="a"),
                                completions(30, 9, 0, 1, api_key_id="kb", project_id="b")]
    assert results(store.usage(query(**{"group_by[]": "batch,user_id"})))[0] == [
        completions(30, 12, 8, 2, batch=False), completions(30, 9, 0, 1, batch=True)]


def test_a_tenant_sees_its_own_usage_only(store):
    assert results(store.usage(query(tenant="a"))) == [[completions(30, 12, 8, 2)], [], [completions(1, 1, 0, 1)]]
    assert results(store.usage(query(tenant="a", project_ids="b"))) == [[], [], []]


def test_filters(store):
    assert results(store.usage(query(models="llama-sql"))) == [[completions(20, 7, 8, 1)], [], []]
    assert results(store.usage(query(api_key_ids=["kb"], batch="false"))) == [[], [], [completions(100, 1, 50, 1)]]


def test_embeddings_are_their_own_kind(store):
    page = store.usage(query("embeddings", group_by="model"))
    assert results(page) == [[embeddings(4, 1, model="mini")], [], [embeddings(6, 1, model="mini")]]


def test_pages_of_hourly_buckets(db_url):
    s = UsageStore(db_url)
    s.write([rec(T0 + 100, prompt=1, completion=2), rec(T0 + 3 * HOUR + 5, prompt=3, completion=4)])
    params = {"start_time": str(T0), "end_time": str(T0 + 5 * HOUR), "bucket_width": "1h", "limit": "2"}
    pages = [s.usage(parse_query("completions", params, None))]
    while pages[-1]["has_more"]:
        pages.append(s.usage(parse_query("completions", {**params, "page": pages[-1]["next_page"]}, None)))
    assert [[b["start_time"] for b in p["data"]] for p in pages] == [[T0, T0 + HOUR], [T0 + 2 * HOUR, T0 + 3 * HOUR],
                                                                     [T0 + 4 * HOUR]]
    assert [results(p) for p in pages] == [[[completions(1, 2, 0, 1)], []], [[], [completions(3, 4, 0, 1)]], [[]]]
    assert [p["next_page"] is None for p in pages] == [False, False, True]
    s.close()


def test_without_end_time_buckets_reach_now(db_url):
    s = UsageStore(db_url)
    now = int(time.time())
    s.write([rec(now - 60, prompt=7, completion=1)])
    page = s.usage(parse_query("completions", {"start_time": str(now - 5400), "bucket_width": "1h"}, None))
    assert [b["start_time"] for b in page["data"]] == [now - 5400, now - 1800]
    assert results(page) == [[], [completions(7, 1, 0, 1)]]
    s.close()


def test_tokens_since_restores_a_daily_budget(store):
    assert store.tokens_since(T0) == {"a": 1048, "b": 146}
    assert store.tokens_since(T0 + 2 * DAY) == {"a": 1002, "b": 107}
    assert store.tokens_since(T0 + 2 * DAY + 86399.9) == {"a": 1002}
    assert store.tokens_since(T0 + 4 * DAY) == {}


def test_ten_thousand_records_in_one_write(db_url):
    s = UsageStore(db_url)
    s.write([rec(T0 + i * 8.64, tenant=f"t{i % 3}", prompt=3, completion=2) for i in range(10_000)])
    assert results(s.usage(parse_query("completions", {"start_time": str(T0), "end_time": str(T0 + DAY)}, None))) \
        == [[completions(30_000, 20_000, 0, 10_000)]]
    assert s.tokens_since(T0) == {"t0": 16_670, "t1": 16_665, "t2": 16_665}
    s.close()


def test_a_second_store_on_the_same_database_sees_the_records(db_url, store):
    again = UsageStore(db_url.replace("postgresql://", "postgres://"))
    assert again.tokens_since(T0) == {"a": 1048, "b": 146}
    again.close()


def test_a_plain_path_is_a_sqlite_file_in_wal_mode(tmp_path):
    path = tmp_path / "cache" / "usage.db"
    UsageStore(str(path)).close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("url,named", [
    ("postgresql://raylm:s3cret@127.0.0.1:{port}/usage", "postgresql+psycopg://raylm:***@127.0.0.1:{port}/usage"),
    ("mysql://raylm:s3cret@127.0.0.1:{port}/usage", "mysql://raylm:***@127.0.0.1:{port}/usage"),  # no driver
    ("sqlite:///{tmp}/a-file/usage.db", "sqlite:///{tmp}/a-file/usage.db"),  # a-file is a file
])
def test_an_unreachable_database_is_a_config_error_without_its_password(url, named, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    port = free_port()
    with pytest.raises(errors.ConfigError) as exc:
        UsageStore(url.format(port=port, tmp=tmp_path))
    message = str(exc.value)
    assert errors.CONFIG_ERROR in message and named.format(port=port, tmp=tmp_path) in message
    assert "s3cret" not in message


def test_parse_query_reads_arrays_as_openai_sends_them():
    q = parse_query("completions", {"start_time": "100", "group_by": ["model", "api_key_id,project_id"],
                                    "models[]": ["m1", "m2"], "batch": "TRUE", "limit": "31"}, "a")
    assert q == UsageQuery(kind="completions", start_time=100, group_by=("model", "api_key_id", "project_id"),
                           tenant="a", models=("m1", "m2"), batch=True, limit=31)


@pytest.mark.parametrize("kind,params,param,code", [
    ("completions", {}, "start_time", "missing_required_parameter"),
    ("completions", {"start_time": "1.5"}, "start_time", "invalid_type"),
    ("completions", {"start_time": "abc"}, "start_time", "invalid_type"),
    ("completions", {"start_time": "100", "end_time": "100"}, "end_time", "invalid_value"),
    ("completions", {"start_time": "100", "bucket_width": "2d"}, "bucket_width", "invalid_value"),
    ("completions", {"start_time": "100", "limit": "32"}, "limit", "invalid_value"),
    ("completions", {"start_time": "100", "bucket_width": "1h", "limit": "169"}, "limit", "invalid_value"),
    ("completions", {"start_time": "100", "limit": "0"}, "limit", "invalid_value"),
    ("completions", {"start_time": "100", "group_by": "tenant"}, "group_by", "invalid_value"),
    ("embeddings", {"start_time": "100", "group_by": "model,batch"}, "group_by", "invalid_value"),
    ("completions", {"start_time": "100", "batch": "maybe"}, "batch", "invalid_value"),
    ("completions", {"start_time": "100", "page": "garbage"}, "page", "invalid_value"),
    ("completions", {"start_time": "100", "page": "page_MTAx"}, "page", "invalid_value"),  # 101: no bucket's start
])
def test_parse_query_refuses_what_openai_refuses(kind, params, param, code):
    with pytest.raises(errors.InvalidRequestError) as exc:
        parse_query(kind, params, None)
    assert (exc.value.status, exc.value.param, exc.value.code) == (400, param, code)
