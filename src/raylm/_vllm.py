"""The one door to vLLM's internals: every name raylm takes from vLLM beyond its public offline API (`LLM`,
`SamplingParams`, `TokensPrompt`, `AsyncEngineArgs`), each with the public API it lacks. vLLM moves such
names between releases (`init_app_state`, `get_max_tokens` live elsewhere in other versions);
`tests/unit/test_internals.py` loads every one, so an upgrade fails there, by name.

Loaded lazily: importing raylm (config, CLI, tests) never imports vLLM.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Any

_OPENAI = "vllm.entrypoints.openai"
# name: (module, attribute, the public API that is missing)
NAMES: dict[str, tuple[str, str, str]] = {
    "make_arg_parser": ("vllm.entrypoints.launchers.cli_args", "make_arg_parser",
                        "`vllm serve`'s own defaults as a value (raylm builds the serving classes from them)"),
    "FlexibleArgumentParser": ("vllm.utils.argparse_utils", "FlexibleArgumentParser", "the same"),
    "init_app_state": ("vllm.entrypoints.launchers.api_server.app_state", "init_app_state",
                       "vLLM's OpenAI serving classes without its HTTP server (one call per request kind)"),
    "AsyncLLM": ("vllm.v1.engine.async_llm", "AsyncLLM",
                 "an async engine built from a VllmConfig with custom stat loggers (vllm.AsyncLLMEngine is it, "
                 "but from_vllm_config is not documented)"),
    "UsageContext": ("vllm.usage.usage_lib", "UsageContext", "the same"),
    "StatLoggerBase": ("vllm.v1.metrics.loggers", "StatLoggerBase",
                       "an engine step callback (raylm's health check watches steps through a stat logger)"),
    "RayPrometheusStatLogger": ("vllm.v1.metrics.ray_wrappers", "RayPrometheusStatLogger",
                                "engine metrics through Ray's metrics export (Ray Serve LLM uses it the same way)"),
    "get_max_tokens": ("vllm.entrypoints.serve.utils.api_utils", "get_max_tokens",
                       "validating sampling parameters before a request is queued"),
    "create_error_response": ("vllm.entrypoints.serve.exception_handling.error_response", "create_error_response",
                              "mapping vLLM's exceptions to (status, message) as its server does"),
    "ErrorResponse": ("vllm.entrypoints.serve.engine.protocol", "ErrorResponse", "the same"),
    "current_platform": ("vllm.platforms", "current_platform", "which device the engine runs on"),
    "OMPProcessManager": ("vllm.utils.ompmultiprocessing", "OMPProcessManager",
                          "the CPU platform's OpenMP binding as a value (raylm runs the worker inside "
                          "EngineCore with it: engine/vllm.py cpu_layout)"),
    "get_mp_context": ("vllm.v1.engine.utils", "get_mp_context",
                       "choosing how EngineCore's process starts (vLLM forces spawn in a Ray actor; raylm forks it "
                       "from the replica that imported vLLM already: engine/vllm.py engine_core_by_fork)"),
    "VLLM_PROCESS_NAME_PREFIX": ("vllm.envs", "VLLM_PROCESS_NAME_PREFIX",
                                 "the prefix of vLLM's process titles (VLLM::EngineCore), as a value"),
    "ChatCompletionRequest": (f"{_OPENAI}.chat_completion.protocol", "ChatCompletionRequest",
                              "the OpenAI request models as a public protocol module"),
    "CompletionRequest": (f"{_OPENAI}.completion.protocol", "CompletionRequest", "the same"),
    "ResponsesRequest": (f"{_OPENAI}.responses.protocol", "ResponsesRequest", "the same"),
    "AnthropicMessagesRequest": ("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest", "the same"),
    "AnthropicCountTokensRequest": ("vllm.entrypoints.anthropic.protocol", "AnthropicCountTokensRequest",
                                    "the same"),
    "EmbeddingRequest": ("vllm.entrypoints.pooling.embed.protocol", "EmbeddingRequest", "the same"),
    "ScoreRequest": ("vllm.entrypoints.pooling.scoring.protocol", "ScoreRequest", "the same"),
    "RerankRequest": ("vllm.entrypoints.pooling.scoring.protocol", "RerankRequest", "the same"),
    "TokenizeRequest": ("vllm.entrypoints.serve.tokenize.protocol", "TokenizeRequest", "the same"),
    "DetokenizeRequest": ("vllm.entrypoints.serve.tokenize.protocol", "DetokenizeRequest", "the same"),
    "LoadLoRAAdapterRequest": ("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest",
                               "registering a LoRA adapter with a running server's model registry (vLLM's "
                               "/v1/load_lora_adapter without its HTTP route)"),
    # The CPU LoRA ops, where engine/vllm_fixes.py mends a bug (each module that holds them).
    "lora_cpu_ops": ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink",
                     "LoRA ops that skip tokens without an adapter (vLLM PR 48421)"),
    "lora_cpu_ops_export": ("vllm.lora.ops.torch_ops", "bgmv_shrink", "the same"),
    "lora_cpu_punica": ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_shrink", "the same"),
}


@functools.cache
def load(name: str) -> Any:
    module, attribute, _ = NAMES[name]
    return getattr(importlib.import_module(module), attribute)


def module(name: str) -> Any:
    """The module that holds the name (to replace it there: engine/vllm_fixes.py)."""
    return importlib.import_module(NAMES[name][0])


# vLLM declares its parser registries as dict literals (name: (module, class)) and registers them lazily:
# reading the literal takes milliseconds where importing a registry takes ~15 s (vLLM imports torch). A config
# loads without vLLM; tests/unit/test_internals.py checks these names against the registries themselves.
PARSER_REGISTRIES = {"tool": ("tool_parsers/__init__.py", "_TOOL_PARSERS_TO_REGISTER"),
                     "reasoning": ("reasoning/__init__.py", "_REASONING_PARSERS_TO_REGISTER")}


@functools.cache
def parser_names(kind: str) -> frozenset[str]:
    """The names of vLLM's built-in tool (`kind` "tool") or reasoning parsers; empty without vLLM here."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    file, variable = PARSER_REGISTRIES[kind]
    tree = ast.parse((Path(spec.submodule_search_locations[0]) / file).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == variable for t in node.targets):
            return frozenset(ast.literal_eval(node.value))
    return frozenset()
