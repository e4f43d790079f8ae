"""The vLLM engine: AsyncLLM plus vLLM's own OpenAI serving classes, so API coverage follows vLLM.

vLLM is imported lazily, inside methods: importing raylm (config, CLI, tests) must not import vLLM.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from raylm import errors
from raylm.engine.protocol import Endpoint, Result

logger = logging.getLogger(__name__)

_SSE_PREFIX = "data: "


class VLLMEngine:
    """One AsyncLLM (its EngineCore runs in a child process) serving one model under one name."""

    def __init__(self, model: str, served_name: str, task: str, engine_args: dict[str, Any]) -> None:
        self.model = model
        self.served_name = served_name
        self.task = task
        self.engine_args = dict(engine_args)
        self.endpoints: frozenset[Endpoint] = (
            frozenset({"embeddings"}) if task == "embed" else frozenset({"chat", "completions"}))
        self._stack = AsyncExitStack()
        self._state: Any = None
        self.client: Any = None

    def build_args(self) -> Any:
        """vLLM's own serve arguments (defaults from its parser), with ours and the user's on top."""
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
        args.model = self.model
        args.served_model_name = [self.served_name]
        if self.task == "embed":
            args.runner = "pooling"
        known = vars(args)
        for key, value in self.engine_args.items():
            attr = key.replace("-", "_")
            if attr not in known:
                raise ValueError(f"unknown vLLM engine argument {key!r}")
            setattr(args, attr, value)
        return args

    async def start(self) -> None:
        import ray
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.build_args()
        engine_args = AsyncEngineArgs.from_cli_args(args)
        context = UsageContext.OPENAI_API_SERVER
        # In a Ray process, vLLM's Prometheus metrics go out through Ray's metrics export (as in Ray Serve LLM).
        loggers = None
        if ray.is_initialized() and not engine_args.disable_log_stats:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers = [RayPrometheusStatLogger]
        self.client = AsyncLLM.from_vllm_config(
            engine_args.create_engine_config(usage_context=context), usage_context=context, stat_loggers=loggers,
            enable_log_requests=engine_args.enable_log_requests, disable_log_stats=engine_args.disable_log_stats)
        self._stack.callback(self.client.shutdown)
        tasks = await self.client.get_supported_tasks()
        self._state = State()
        await init_app_state(self.client, self._state, args, tasks)

    async def create(self, endpoint: Endpoint, body: dict, request_id: str) -> Result:
        if endpoint not in self.endpoints:
            raise errors.InvalidRequestError(
                f"model {self.served_name!r} does not serve /v1/{_PATHS[endpoint]}",
                param="model", code="unsupported_endpoint")
        request_cls, handler = self._handler(endpoint)
        try:
            request = _adapter(request_cls).validate_python(body)
        except Exception as exc:  # pydantic's ValidationError, or vLLM's own checks inside validators
            if hasattr(exc, "errors"):
                raise errors.validation_error(exc) from None
            raise _from_vllm_exception(exc) from None
        try:
            result = await handler(request, None)
        except Exception as exc:  # vLLM reports bad requests by raising; map them as its server would
            raise _from_vllm_exception(exc) from exc
        return _to_result(result)

    def _handler(self, endpoint: Endpoint) -> tuple[type, Any]:
        state = self._state
        if endpoint == "chat":
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            return ChatCompletionRequest, state.openai_serving_chat.create_chat_completion
        if endpoint == "completions":
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest

            return CompletionRequest, state.openai_serving_completion.create_completion
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

        return EmbeddingRequest, state.serving_embedding

    def prompt_tokens(self, endpoint: Endpoint, body: dict) -> int:
        if endpoint == "chat":
            messages = body.get("messages")
            parts = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
            # Chat content may be a list of typed parts; only text parts cost prompt tokens here.
            parts = [p.get("text") if isinstance(p, dict) else p
                     for part in parts for p in (part if isinstance(part, list) else [part])]
        else:
            value = body.get("prompt" if endpoint == "completions" else "input")
            parts = value if isinstance(value, list) and value and not isinstance(value[0], int) else [value]
        tokenizer = self.client.get_tokenizer()
        total = 0
        for part in parts:
            if isinstance(part, str):
                total += len(tokenizer.encode(part, add_special_tokens=False))
            elif isinstance(part, list):
                total += len(part)  # token ids
        return total

    def num_running(self) -> int:
        return self.client.get_num_unfinished_requests()

    async def health(self) -> None:
        await self.client.check_health()

    async def shutdown(self) -> None:
        await self._stack.aclose()


@functools.cache
def _adapter(request_cls: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(request_cls)  # EmbeddingRequest is a Union, not a model class


_PATHS: dict[str, str] = {"chat": "chat/completions", "completions": "completions", "embeddings": "embeddings"}


def _from_vllm_exception(exc: Exception) -> errors.APIError:
    if isinstance(exc, errors.APIError):
        return exc
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    err = create_error_response(exc).error
    return errors.from_status(int(err.code), err.message, err.param)


def _to_result(result: Any) -> Result:
    from fastapi.responses import JSONResponse
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        raise errors.from_status(int(result.error.code), result.error.message, result.error.param)
    if isinstance(result, JSONResponse):
        if result.status_code >= 400:
            err = json.loads(result.body)["error"]
            raise errors.from_status(result.status_code, err["message"], err.get("param"))
        return bytes(result.body)
    if hasattr(result, "model_dump_json"):
        return result.model_dump_json().encode()
    if hasattr(result, "__aiter__"):
        return _payloads(result)
    raise errors.InvalidRequestError("this request's response format is not supported",
                                     param="encoding_format")


async def _payloads(frames: AsyncIterator[str]) -> AsyncIterator[str]:
    """vLLM's SSE frames back to bare chunk payloads; an error event becomes an exception."""
    async for frame in frames:
        payload = frame[len(_SSE_PREFIX):].rstrip("\n") if frame.startswith(_SSE_PREFIX) else frame.strip()
        if not payload:
            continue
        if payload == "[DONE]":
            return
        if payload.startswith('{"error"'):
            err = json.loads(payload)["error"]
            raise errors.from_status(int(err.get("code") or 500), err["message"], err.get("param"))
        yield payload
