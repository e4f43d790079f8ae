"""The usage database: every request's UsageRecord, and OpenAI's usage API read from it.

    Ledger ── write(records) ──► raylm_usage (one row a request; time in integer milliseconds)
    GET /v1/organization/usage/{completions,embeddings} ── parse_query ─► usage(query) ─► OpenAI's page
    Ledger start ── tokens_since(midnight) ──► each tenant's tokens today (its daily budget, restored)

One SQLAlchemy Core schema for SQLite (a file, in WAL mode so the API's reads never wait for the writer) and
PostgreSQL (psycopg 3). Time is kept in integer milliseconds so that a bucket is an integer division on both:
casting a float to an integer rounds on PostgreSQL and truncates on SQLite. A page's buckets follow each other
from start_time, empty ones included, as OpenAI's do; `next_page` is the next bucket's start, encoded.

OpenAI's names for raylm's: project_id is the tenant, api_key_id the key's id, model the adapter a request
named (else the model it asked for). A request counts only if the engine ran it (any tokens): one refused
before the engine is no model request. Every method blocks: callers run them on a thread.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from raylm import errors
from raylm.contract import UsageRecord

Kind = Literal["completions", "embeddings"]
BucketWidth = Literal["1m", "1h", "1d"]

WIDTH_S: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
LIMITS: dict[str, tuple[int, int]] = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # (default, max) buckets
ROUTES: dict[str, tuple[str, ...]] = {"completions": ("chat", "completions", "responses", "messages"),
                                      "embeddings": ("embeddings", "score", "rerank")}
GROUP_BY: dict[str, tuple[str, ...]] = {
    "completions": ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier"),
    "embeddings": ("project_id", "user_id", "api_key_id", "model")}
# Grouping fields raylm has no values for (no users, one service tier): always null, never splitting a bucket.
ALWAYS_NULL = frozenset({"user_id", "service_tier"})
PAGE_PREFIX = "page_"
CONNECT_TIMEOUT_S = 10  # a PostgreSQL host that drops packets fails start-up in this long, not TCP's minutes

metadata = sa.MetaData()
usage_table = sa.Table(
    "raylm_usage", metadata,
    sa.Column("time", sa.BigInteger, nullable=False),  # Unix milliseconds
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("key_id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("adapter", sa.Text, nullable=False),
    sa.Column("route", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("error_code", sa.Text, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("ttft_s", sa.Double, nullable=True),
    sa.Column("duration_s", sa.Double, nullable=False),
    sa.Column("batch", sa.Boolean, nullable=False),
    sa.Column("replica", sa.Text, nullable=False),
    sa.Column("trace_id", sa.Text, nullable=False),
    sa.Index("ix_raylm_usage_time", "time"),
    sa.Index("ix_raylm_usage_tenant_time", "tenant", "time"),
)


@dataclass(frozen=True)
class UsageQuery:
    kind: Kind
    start_time: int  # Unix seconds, inclusive
    end_time: int | None = None  # exclusive; None: now
    bucket_width: BucketWidth = "1d"
    group_by: tuple[str, ...] = ()
    tenant: str | None = None  # a non-admin caller sees its own tenant only
    project_ids: tuple[str, ...] = ()
    api_key_ids: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    batch: bool | None = None
    limit: int | None = None  # buckets a page; None: the bucket width's default
    page: str | None = None  # a previous page's next_page


def _ms(t: float) -> int:
    return round(t * 1000)


def engine_url(url: str) -> str:
    """A SQLAlchemy URL: a plain path is a SQLite file; PostgreSQL goes through psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def redact(url: str) -> str:
    """A database URL (or an SQLite path) as it may be shown: without its password."""
    return _redact(url)[0]


def _redact(url: str) -> tuple[str, str | None]:
    """The URL without its password, and the password."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url), None
    return parsed.render_as_string(hide_password=True), str(parsed.password) if parsed.password else None


class UsageStore:
    def __init__(self, url: str) -> None:
        self.url = engine_url(url)
        self.name, password = _redact(self.url)
        try:
            self.engine = self._engine()
        except (sa.exc.SQLAlchemyError, OSError, ImportError) as exc:
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
            if password:  # a driver that echoed it; whole words only ("y" must not mask "sqlalchemy")
                reason = re.sub(rf"(?<!\w){re.escape(password)}(?!\w)", "***", reason)
            raise errors.ConfigError(f"the usage database {self.name} cannot be opened: {reason}") from None

    def _engine(self) -> sa.Engine:
        """An engine whose table and indexes exist (made when missing)."""
        engine = self._connect()
        try:
            metadata.create_all(engine)
        except BaseException:
            engine.dispose()
            raise
        return engine

    def _connect(self) -> sa.Engine:
        url = sa.make_url(self.url)
        if url.get_backend_name() != "sqlite":
            connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
            return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url)

        @sa.event.listens_for(engine, "connect")
        def _wal(conn: Any, _record: Any) -> None:
            # WAL: readers and the writer no longer block each other; NORMAL sync is safe under WAL.
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine

    def write(self, records: Sequence[UsageRecord]) -> None:
        """All of them in one transaction (executemany)."""
        if not records:
            return
        rows = [{**{name: getattr(r, name) for name in usage_table.c.keys()}, "time": _ms(r.time)} for r in records]
        with self.engine.begin() as conn:
            conn.execute(usage_table.insert(), rows)

    def tokens_since(self, since: float) -> dict[str, int]:
        """Each tenant's prompt + completion tokens since `since` (Unix seconds, inclusive)."""
        t = usage_table.c
        tokens = sa.func.sum(t.prompt_tokens + t.completion_tokens)
        stmt = (sa.select(t.tenant, tokens).where(t.time >= _ms(since))
                .where((t.prompt_tokens > 0) | (t.completion_tokens > 0)).group_by(t.tenant))
        with self.engine.connect() as conn:
            return {tenant: int(n) for tenant, n in conn.execute(stmt)}

    def usage(self, query: UsageQuery) -> dict[str, Any]:
        """OpenAI's usage page: `limit` consecutive buckets from the page's first, empty ones included."""
        width = WIDTH_S[query.bucket_width]
        end = query.end_time if query.end_time is not None else int(time.time())
        first = query.start_time if query.page is None else decode_page(query.page)
        limit = min(query.limit or LIMITS[query.bucket_width][0], LIMITS[query.bucket_width][1])
        starts = range(first, end, width)[:limit]  # a range: a year of minutes is never listed
        after = first + len(starts) * width
        results = self._results(query, first, min(after, end), width) if starts else {}
        data = [{"object": "bucket", "start_time": s, "end_time": s + width, "results": results.get(i, [])}
                for i, s in enumerate(starts)]
        has_more = after < end
        return {"object": "page", "data": data, "has_more": has_more,
                "next_page": encode_page(after) if has_more else None}

    def _results(self, query: UsageQuery, first: int, stop: int, width: int) -> dict[int, list[dict[str, Any]]]:
        """Each bucket's results (by bucket index from `first`), over [first, stop) seconds."""
        rows = _rows(query, first, stop, width)
        groups = [g for g in query.group_by if g not in ALWAYS_NULL]
        cols = rows.c
        sums = [sa.func.sum(cols.prompt_tokens), sa.func.sum(cols.completion_tokens),
                sa.func.sum(cols.cached_tokens), sa.func.count()]
        keys = [cols.bucket, *(cols[g] for g in groups)]
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(*keys, *sums).group_by(*keys)).all()
        by_bucket: dict[int, list[dict[str, Any]]] = {}
        for row in found:
            values = {g: bool(v) if g == "batch" else (v or None) for g, v in zip(groups, row[1:1 + len(groups)])}
            tokens = (int(n or 0) for n in row[1 + len(groups):])
            by_bucket.setdefault(int(row[0]), []).append(_result(query.kind, values, *tokens))
        # Sorted here rather than by the database: PostgreSQL's collation and SQLite's byte order differ.
        return {i: sorted(rs, key=lambda r: tuple((r[g] is not None, r[g]) for g in groups))
                for i, rs in by_bucket.items()}

    def close(self) -> None:
        self.engine.dispose()


def _rows(query: UsageQuery, first: int, stop: int, width: int) -> sa.Subquery:
    """The counted records in [first, stop), with their bucket and OpenAI's names. A subquery, so that the
    grouping repeats column names, not expressions whose bound values PostgreSQL cannot tell are equal."""
    t = usage_table.c
    model = sa.case((t.adapter != "", t.adapter), else_=t.model)
    stmt = sa.select(((t.time - _ms(first)) // (width * 1000)).label("bucket"), t.tenant.label("project_id"),
                     t.key_id.label("api_key_id"), model.label("model"), t.batch, t.prompt_tokens,
                     t.completion_tokens, t.cached_tokens)
    stmt = stmt.where(t.time >= _ms(first), t.time < _ms(stop), t.route.in_(ROUTES[query.kind]),
                      (t.prompt_tokens > 0) | (t.completion_tokens > 0))
    if query.tenant is not None:
        stmt = stmt.where(t.tenant == query.tenant)
    if query.project_ids:
        stmt = stmt.where(t.tenant.in_(query.project_ids))
    if query.api_key_ids:
        stmt = stmt.where(t.key_id.in_(query.api_key_ids))
    if query.models:
        stmt = stmt.where(model.in_(query.models))
    if query.batch is not None and query.kind == "completions":
        stmt = stmt.where(t.batch == query.batch)
    return stmt.subquery()


def _result(kind: str, groups: Mapping[str, Any], prompt: int, completion: int, cached: int,
            count: int) -> dict[str, Any]:
    fields = {name: groups.get(name) for name in GROUP_BY[kind]}  # null unless grouped by
    if kind == "embeddings":
        return {"object": "organization.usage.embeddings.result", "input_tokens": prompt,
                "num_model_requests": count, **fields}
    return {"object": "organization.usage.completions.result", "input_tokens": prompt,
            "output_tokens": completion, "input_cached_tokens": cached, "input_audio_tokens": 0,
            "output_audio_tokens": 0, "num_model_requests": count, **fields}


def encode_page(start: int) -> str:
    return PAGE_PREFIX + base64.urlsafe_b64encode(str(start).encode()).decode().rstrip("=")


def decode_page(page: str) -> int:
    """A next_page cursor's bucket start; InvalidRequestError for anything this module did not write."""
    body = page.removeprefix(PAGE_PREFIX)
    try:
        text = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        text = ""
    _require(page.startswith(PAGE_PREFIX) and re.fullmatch(r"\d{1,12}", text) is not None, "page",
             f"invalid page cursor: {page!r}")
    return int(text)


def _values(params: Mapping[str, str | list[str]], name: str) -> list[str]:
    """An array parameter: repeated keys (`name=a&name=b` or `name[]=a`), each possibly comma-separated."""
    found: list[str] = []
    for key in (name, f"{name}[]"):
        raw = params.get(key, [])
        for item in [raw] if isinstance(raw, str) else raw:
            found.extend(v.strip() for v in item.split(",") if v.strip())
    return found


def _one(params: Mapping[str, str | list[str]], name: str) -> str | None:
    raw = params.get(name)
    if isinstance(raw, list):
        return raw[-1] if raw else None  # the last one, as Starlette's query_params[name] reads it
    return raw


def _int(params: Mapping[str, str | list[str]], name: str) -> int | None:
    raw = _one(params, name)
    if raw is None:
        return None
    if not re.fullmatch(r"\d{1,12}", raw.strip()):
        raise errors.InvalidRequestError(f"{name} must be a non-negative integer, got {raw!r}", param=name,
                                         code="invalid_type")
    return int(raw)


def _require(ok: bool, param: str, message: str, code: str | None = None) -> None:
    if not ok:
        raise errors.InvalidRequestError(message, param=param, code=code)


def parse_query(kind: Kind, params: Mapping[str, str | list[str]], tenant: str | None) -> UsageQuery:
    """A usage route's query string, checked as OpenAI checks it. `tenant`: the caller's own tenant when it
    may see only its own usage, None for an admin."""
    start, end = _int(params, "start_time"), _int(params, "end_time")
    if start is None:
        raise errors.InvalidRequestError("Missing required parameter: 'start_time'.", param="start_time",
                                         code="missing_required_parameter")
    _require(end is None or end > start, "end_time", "end_time must be after start_time")
    width = _one(params, "bucket_width") or "1d"
    _require(width in WIDTH_S, "bucket_width", f"bucket_width must be one of 1m, 1h, 1d, got {width!r}")
    limit, most = _int(params, "limit"), LIMITS[width][1]
    _require(limit is None or 1 <= limit <= most, "limit", f"limit must be between 1 and {most} for {width} buckets")
    group_by = tuple(dict.fromkeys(_values(params, "group_by")))
    for g in group_by:
        _require(g in GROUP_BY[kind], "group_by", f"group_by must be among {', '.join(GROUP_BY[kind])}, got {g!r}")
    batch = None
    if kind == "completions" and (raw := _one(params, "batch")) is not None:
        _require(raw.lower() in ("true", "false"), "batch", f"batch must be true or false, got {raw!r}")
        batch = raw.lower() == "true"
    page = _one(params, "page") or None
    if page is not None:
        first = decode_page(page)
        _require(first >= start and not (first - start) % WIDTH_S[width] and (end is None or first < end), "page",
                 f"page {page!r} is not a page of this query")
    return UsageQuery(kind=kind, start_time=start, end_time=end, bucket_width=width,  # type: ignore[arg-type]
                      group_by=group_by, tenant=tenant, project_ids=tuple(_values(params, "project_ids")),
                      api_key_ids=tuple(_values(params, "api_key_ids")), models=tuple(_values(params, "models")),
                      batch=batch, limit=limit, page=page)
