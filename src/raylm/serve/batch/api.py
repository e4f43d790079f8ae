"""The Batch API's HTTP routes on the ingress: files here (store.py, upload.py), batches on BatchJobs.

    POST /v1/files (multipart: purpose=batch, file, expires_after)   GET /v1/files[?purpose&limit&after]
    GET /v1/files/{id}   GET /v1/files/{id}/content   DELETE /v1/files/{id}
    POST /v1/batches   GET /v1/batches[?limit&after]   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

Each route resolves the caller from the API key first; a tenant sees only its own objects (without keys,
every caller is the one anonymous owner: the tenant header never reaches a tenant's objects). Quotas per
owner: stored bytes and files (429 insufficient_quota), batches not yet finished (BatchJobs, 429). Disk work
runs on threads, never on the event loop that relays streams.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.exceptions import RayTaskError

from raylm import errors
from raylm.serve.batch import upload
from raylm.serve.batch.store import Store, page, public
from raylm.serve.edge import http

MAX_PAGE = 100
MIN_TTL_S, MAX_TTL_S = 3600, 30 * 24 * 3600  # OpenAI's bounds on expires_after.seconds


def add_routes(api: FastAPI, ingress: Any) -> None:
    """The routes, on the ingress's app; what they need of the ingress is read when a request comes."""
    def store() -> Store:
        return ingress.batch_store

    def jobs() -> Any:
        return ingress.batch_jobs

    async def answer(request: Request, work: Callable[[str], Any]) -> Response:
        """`work(owner)`'s result as JSON, or its error as OpenAI's. A plain function (disk work) runs on a
        thread; a coroutine function (a call to BatchJobs) on the event loop."""
        rid = http.request_id(request)
        try:
            owner = ingress.access.caller(request.headers).owner
            if inspect.iscoroutinefunction(work):
                result = await work(owner)
            else:
                result = await asyncio.to_thread(work, owner)
        except Exception as exc:
            cause = exc.cause if isinstance(exc, RayTaskError) else exc
            return http.error_response(cause, rid)
        if isinstance(result, Response):
            return result
        return JSONResponse(result, headers={http.REQUEST_ID_HEADER: rid})

    @api.post("/v1/files")
    async def create_file(request: Request) -> Response:
        async def work(owner: str) -> dict:
            return await _create_file(request, ingress.config, store(), owner)
        return await answer(request, work)

    @api.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, limit: int = 20,
                         after: str | None = None) -> Response:
        return await answer(request, lambda owner: page(store().files(owner, purpose), _limit(limit), after))

    @api.get("/v1/files/{file_id}")
    async def retrieve_file(request: Request, file_id: str) -> Response:
        return await answer(request, lambda owner: public(store().file(owner, file_id)))

    @api.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Response:
        return await answer(request, lambda owner: store().delete_file(owner, file_id))

    @api.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        return await answer(request, lambda owner: StreamingResponse(
            _read(store().file_path(owner, file_id)), media_type="application/octet-stream"))

    @api.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        async def work(owner: str) -> dict:
            body = await http.json_body(request, ingress.config.max_request_bytes, ingress.config.http.body_timeout_s)
            return await jobs().create.remote(owner, body)
        return await answer(request, work)

    @api.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> Response:
        async def work(owner: str) -> dict:
            return await jobs().list_batches.remote(owner, _limit(limit), after)
        return await answer(request, work)

    @api.get("/v1/batches/{batch_id}")
    async def retrieve_batch(request: Request, batch_id: str) -> Response:
        async def work(owner: str) -> dict:
            return await jobs().retrieve.remote(owner, batch_id)
        return await answer(request, work)

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        async def work(owner: str) -> dict:
            return await jobs().cancel.remote(owner, batch_id)
        return await answer(request, work)


async def _create_file(request: Request, config: Any, store: Store, owner: str) -> dict:
    """Stream the upload to disk within the owner's room; then check it and keep it."""
    used_bytes, used_files = await asyncio.to_thread(store.usage, owner)
    if used_files >= config.batch_max_files:
        raise errors.OverloadedError(f"this tenant keeps {used_files} files, the most it may "
                                     f"(serve.batch_max_files); delete some", code="insufficient_quota")
    left = config.batch_max_stored_bytes - used_bytes
    too_big: errors.APIError = errors.RequestTooLargeError(config.batch_max_file_bytes, "the file",
                                                           "serve.batch_max_file_bytes")
    if left < config.batch_max_file_bytes:
        too_big = errors.OverloadedError(
            f"this tenant's files would pass {config.batch_max_stored_bytes:,} bytes (serve.batch_max_stored_bytes; "
            f"{max(0, left):,} left); delete some", code="insufficient_quota")
    room = max(0, min(config.batch_max_file_bytes, left))
    received = await upload.receive(request, store.files_dir, room, too_big, config.http.body_timeout_s)
    try:
        purpose = received.fields.get("purpose", "")
        if purpose != "batch":
            raise errors.InvalidRequestError("purpose must be batch", param="purpose", code="invalid_purpose")
        lines = received.lines  # an upper bound: blank lines count too
        if lines > config.batch_max_requests:
            lines = await asyncio.to_thread(upload.exact_lines, received.path)
        if lines > config.batch_max_requests:
            raise errors.InvalidRequestError(f"the file has {lines} lines; a batch file holds at most "
                                             f"{config.batch_max_requests}", param="file", code="too_many_requests")
        ttl_s = _ttl(received.fields, config.batch_file_ttl_s)
        record = await asyncio.to_thread(store.adopt_file, owner, received.filename, purpose, received.path,
                                         received.size, ttl_s)
    except BaseException:
        await asyncio.to_thread(received.path.unlink, True)
        raise
    return public(record)


async def _read(path: Path) -> AsyncIterator[bytes]:
    """A file a MiB at a time, each read on a thread, as the client takes it (Starlette's FileResponse reads
    64 KiB a thread hop)."""
    with await asyncio.to_thread(path.open, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, upload.FLUSH_BYTES):
            yield chunk


def _ttl(fields: dict[str, str], default_s: int) -> int:
    """OpenAI's `expires_after[anchor]=created_at` and `expires_after[seconds]` (an hour to 30 days)."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return default_s
    if anchor != "created_at":
        raise errors.InvalidRequestError("expires_after[anchor] must be created_at", param="expires_after[anchor]")
    if seconds is None or not seconds.isdigit() or not MIN_TTL_S <= int(seconds) <= MAX_TTL_S:
        raise errors.InvalidRequestError(f"expires_after[seconds] must be between {MIN_TTL_S} and {MAX_TTL_S}",
                                         param="expires_after[seconds]")
    return min(int(seconds), default_s)


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise errors.InvalidRequestError(f"limit must be between 1 and {MAX_PAGE}", param="limit")
    return limit
