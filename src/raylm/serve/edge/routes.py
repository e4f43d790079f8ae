"""The ingress's routes, each a line: the ingress does the work. Whatever FastAPI or Starlette would answer
in their own shape (unknown route, wrong method, a failure nobody caught) comes out as one OpenAI error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm import errors
from raylm.contract import PATHS, Endpoint
from raylm.serve.batch import api as batch_api
from raylm.serve.edge import http
from raylm.serve.edge.policy import BrowserPolicy, host_allow_list

ROUTES: dict[str, Endpoint] = {path: endpoint for endpoint, paths in PATHS.items() for path in paths}
PLAYGROUND = Path(__file__).parent / "playground"
# The playground's page may load and reach only its own origin: model output cannot pull scripts in, submit
# a form anywhere, re-base its links, or be framed by another page.
_PLAYGROUND_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                   "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def build_api(ingress: Any) -> FastAPI:
    """The routes on `ingress` (an edge.ingress.Ingress)."""
    api = FastAPI(title="raylm", docs_url=None, redoc_url=None, openapi_url=None)
    config = ingress.config
    if config.allowed_origins:  # inner: only requests the policy let through reach it
        api.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["*"])
    api.add_middleware(BrowserPolicy, allowed_hosts=host_allow_list(config.host, config.loopback, config.allowed_hosts),
                       allowed_origins=tuple(o.rstrip("/") for o in config.allowed_origins))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: errors.APIError = errors.NotFoundError(
                f"no route {request.method} {request.url.path}; see /v1/models", code="unknown_route")
        elif exc.status_code == 405:
            err = errors.MethodNotAllowedError(f"{request.url.path} does not take {request.method}")
        else:
            err = errors.from_status(exc.status_code, str(exc.detail))
        rid = http.request_id(request)
        return http.error_response(err, rid)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        rid = http.request_id(request)
        return http.error_response(errors.validation_error(exc), rid)

    @api.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        rid = http.request_id(request)
        return http.error_response(exc, rid)  # 500, internals logged and hidden

    for path, endpoint in ROUTES.items():
        api.add_api_route(path, _route(ingress, endpoint), methods=["POST"])
    batch_api.add_routes(api, ingress)

    @api.get("/v1/models")
    async def list_models(request: Request) -> Response:
        return await ingress.list_models(request)

    @api.get("/v1/models/{model_id:path}")  # names may hold a slash (org/model)
    async def retrieve_model(request: Request, model_id: str) -> Response:
        return await ingress.list_models(request, model_id)

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        return await ingress.change_adapters(request, load=True)

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        return await ingress.change_adapters(request, load=False)

    @api.get("/", include_in_schema=False)
    async def playground() -> Response:
        return _static(PLAYGROUND / "index.html")

    @api.get("/playground/{name:path}", include_in_schema=False)
    async def playground_file(name: str) -> Response:
        path = (PLAYGROUND / name).resolve()
        if not path.is_relative_to(PLAYGROUND.resolve()) or not path.is_file():
            raise StarletteHTTPException(404)
        return _static(path)

    @api.get("/v1/organization/usage/{kind}")
    async def usage(request: Request, kind: Literal["completions", "embeddings"]) -> Response:
        return await ingress.usage_page(request, kind)

    @api.get("/status")
    async def service_status(request: Request) -> Response:
        return await ingress.status(request)

    @api.get("/health")
    @api.get("/-/healthz", include_in_schema=False)  # Serve's proxy path, which KubeRay probes on the head
    async def health() -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready() -> JSONResponse:
        return await ingress.ready()

    return api


def _static(path: Path) -> Response:
    return FileResponse(path, headers={"content-security-policy": _PLAYGROUND_CSP, "cache-control": "no-cache",
                                       "x-content-type-options": "nosniff", "x-frame-options": "DENY"})


def _route(ingress: Any, endpoint: Endpoint):
    async def route(request: Request) -> Response:
        return await ingress.serve(endpoint, request)

    return route

