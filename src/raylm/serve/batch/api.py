"""The Batch API's HTTP routes on the ingress: files here (store.py), batches on the BatchJobs deployment.

    POST /v1/files (multipart: purpose=batch, file)   GET /v1/files[?purpose&limit&after]
    GET /v1/files/{id}   GET /v1/files/{id}/content   DELETE /v1/files/{id}
    POST /v1/batches   GET /v1/batches[?limit&after]   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

Each route resolves the caller's tenant from the API key first; a tenant sees only its own objects.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray.exceptions import RayTaskError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from raylm import errors
from raylm.serve.batch.store import Store, page, public, request_lines
from raylm.serve.edge import http

MAX_PAGE = 100


def add_routes(api: FastAPI, ingress: Any) -> None:
    """The routes, on the ingress's app; what they need of the ingress is read when a request comes."""
    def store() -> Store:
        return ingress.batch_store

    def runner() -> Any:
        return ingress.batch_jobs

    async def answer(request: Request, work: Callable[[str], Any]) -> Response:
        """`work(tenant)`'s result (awaited if it must be) as JSON, or its error as OpenAI's."""
        rid = http.request_id(request)
        try:
            tenant = ingress.access.tenant(request.headers).name
            result = work(tenant)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            cause = exc.cause if isinstance(exc, RayTaskError) else exc
            return http.error_response(cause, rid)
        if isinstance(result, Response):
            return result
        return JSONResponse(result, headers={http.REQUEST_ID_HEADER: rid})

    @api.post("/v1/files")
    async def create_file(request: Request) -> Response:
        async def work(tenant: str) -> dict:
            content, filename, purpose = await _upload(request, ingress.options.batch_max_file_bytes)
            if purpose != "batch":
                raise errors.InvalidRequestError("purpose must be batch", param="purpose", code="invalid_purpose")
            lines = len(request_lines(content))
            if lines > ingress.options.batch_max_requests:
                raise errors.InvalidRequestError(
                    f"the file has {lines} lines; a batch file holds at most {ingress.options.batch_max_requests}",
                    param="file", code="too_many_requests")
            return public(store().create_file(tenant, filename, purpose, content))
        return await answer(request, work)

    @api.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, limit: int = 20,
                         after: str | None = None) -> Response:
        return await answer(request, lambda tenant: page(store().files(tenant, purpose), _limit(limit), after))

    @api.get("/v1/files/{file_id}")
    async def retrieve_file(request: Request, file_id: str) -> Response:
        return await answer(request, lambda tenant: public(store().file(tenant, file_id)))

    @api.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Response:
        return await answer(request, lambda tenant: store().delete_file(tenant, file_id))

    @api.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        async def work(tenant: str) -> Response:
            return Response(store().file_path(tenant, file_id).read_bytes(), media_type="application/octet-stream")
        return await answer(request, work)

    @api.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        async def work(tenant: str) -> dict:
            body = await http.json_body(request, ingress.options.max_request_bytes)
            return await runner().create.remote(tenant, body)
        return await answer(request, work)

    @api.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> Response:
        return await answer(request, lambda tenant: runner().list_batches.remote(tenant, _limit(limit), after))

    @api.get("/v1/batches/{batch_id}")
    async def retrieve_batch(request: Request, batch_id: str) -> Response:
        return await answer(request, lambda tenant: runner().retrieve.remote(tenant, batch_id))

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        return await answer(request, lambda tenant: runner().cancel.remote(tenant, batch_id))


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise errors.InvalidRequestError(f"limit must be between 1 and {MAX_PAGE}", param="limit")
    return limit


async def _upload(request: Request, limit: int) -> tuple[bytes, str, str]:
    """The multipart upload's file bytes, file name and purpose; 413 past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + 64 * 1024:  # the form's other parts are small
        raise errors.RequestTooLargeError(limit)
    try:
        form = await request.form(max_files=1, max_fields=8)
    except (MultiPartException, AssertionError) as exc:
        raise errors.InvalidRequestError(f"the body must be multipart/form-data with a file: {exc}",
                                         param="file") from None
    file, purpose = form.get("file"), form.get("purpose")
    if not isinstance(file, UploadFile):
        raise errors.InvalidRequestError("a file is required", param="file", code="missing_file")
    content = await file.read(limit + 1)
    if len(content) > limit:
        raise errors.RequestTooLargeError(limit)
    return content, file.filename or "upload.jsonl", purpose if isinstance(purpose, str) else ""
