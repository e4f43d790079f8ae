"""One typed config tree, from laptop to cluster: YAML file + CLI overrides, nothing else.

Config is plain data: validators check shapes and values only; no downloads, no Ray calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from raylm._vllm import parser_names
from raylm.adapters import adapter_folders
from raylm.models import BUNDLED_PREFIX, MINILM, SMOLLM2, default_cache_dir

# vLLM's serve arguments that are ModelConfig fields (typed and checked); given in engine_args, they move there.
SERVING_ARGS = ("tool_call_parser", "enable_auto_tool_choice", "tool_strict_level", "reasoning_parser",
                "chat_template")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# What a replica runs in its engine by default (docs/serve.md, "The default batch"). On a CPU a step's time grows with
# the batch: 32 (+ burst) keeps each stream's speed and bounds what a flooding tenant costs the others, at the price
# of TTFT under overload (half of 64 clients wait for a slot). With GPUs a step's time barely grows with the batch,
# so the replica runs vLLM's own batch (max_num_seqs 256 on most GPUs) and queues, fairly, only beyond it.
CPU_MAX_RUNNING = 32
GPU_MAX_NUM_SEQS = 256


class AdmissionConfig(_Frozen):
    """Backpressure on each replica: a batch in the engine, a bounded weighted-fair queue, then 429."""

    max_running: int = Field(
        CPU_MAX_RUNNING, ge=1, description="Sequences one replica runs in its engine at once (a request with `n` "
                                           "> 1 counts n); vLLM's max_num_seqs is set to max_running + burst. "
                                           "Default: the engine's batch less burst where the config gives one "
                                           "(engine_args' max_num_seqs), else 32 on a CPU and 248 with GPUs "
                                           "(vLLM's batch of 256 less burst).")
    max_queued: int = Field(
        64, ge=0, description="Requests waiting on one replica. When full, the request served last in "
                              "fair order (the tenant furthest over its share) gets 429.")
    max_queued_tokens: int = Field(32768, ge=1, description="Prompt tokens waiting on one replica.")
    burst: int = Field(
        8, ge=0, description="Extra engine slots for tenants running less than their fair share, so a "
                             "light tenant starts at once instead of waiting behind a flooding one.")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After (seconds) sent with 429 and 503.")
    max_n: int | None = Field(
        None, ge=1, description="Largest `n` (or `best_of`) a request may ask for, as the engine parses it; 400 "
                                "above. Default: 16 on a CPU (each sequence takes an engine slot), 128 with GPUs.")
    max_queue_wait_s: float | None = Field(
        5.0, gt=0, description="A request whose expected wait for a slot (the sequences queued ahead of it at "
                               "the replica's recent finishing rate) is longer gets 429 at once, with that wait "
                               "as Retry-After. None: bounded by max_queued only.")
    batch_max_running: int = Field(
        4, ge=1, description="Sequences of Batch API work one replica runs at once. Batch work is the lowest "
                             "class: it starts only while no other request waits and never queues, so "
                             "interactive requests keep their latency (measured in docs/batch.md).")
    batch_quiet_s: float = Field(
        1.0, ge=0, description="Batch API work starts on a replica only once no interactive request has run "
                               "there for this many seconds (what it already runs finishes). 0: it starts "
                               "whenever slots are free, beside interactive requests, at their latency's cost.")


class AutoscalingConfig(_Frozen):
    """Passed to Serve's autoscaler; it counts running plus queued requests on each replica."""

    min_replicas: int = Field(1, ge=0, description="0 lets the model scale to zero; a request then "
                                                   "waits for a cold start (see serve.cold_start_timeout_s).")
    max_replicas: int = Field(2, ge=1, description="Upper bound of replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time (default: min).")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Running + queued requests per replica to aim for (default: max_running).")
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must last this long before scaling up.")
    downscale_delay_s: float = Field(120.0, ge=0, description="Idleness must last this long before "
                                                              "scaling down.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class HealthConfig(_Frozen):
    """Serve calls each replica's health check: the engine must be alive and, while it holds requests,
    make progress."""

    period_s: float = Field(10.0, gt=0, description="Seconds between health checks.")
    probe_timeout_s: float = Field(
        10.0, gt=0, description="An engine holding requests that finishes no step for this long is stalled. "
                                "After 3 failed checks in a row Serve replaces the replica.")


class APIKey(_Frozen):
    tenant: str = Field(description="Tenant the key belongs to (shown in logs and metrics, never the key).")
    key: SecretStr = Field(description="The secret, sent by clients as `Authorization: Bearer <key>`.")


class TenantConfig(_Frozen):
    weight: float = Field(1.0, gt=0, description="Share of a saturated replica, relative to other tenants.")
    priority: int = Field(0, description="Lower is served first (vLLM's convention), e.g. 0 for a product's "
                                         "users, 1 for internal tools; fairness applies within a priority. "
                                         "Batch API work is a class below every priority.")
    requests_per_minute: int | None = Field(
        None, ge=1, description="Requests admitted in any 60 s, across every ingress replica; past it: 429 "
                                "rate_limit_exceeded with Retry-After. Unset: no limit.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Tokens (prompt + completion) in any 60 s: a request reserves its prompt's "
                                "estimate (characters / 4, as OpenAI estimates) plus its max_tokens when admitted, "
                                "settled with the engine's count when it ends.")
    tokens_per_day: int | None = Field(
        None, ge=1, description="Tokens per UTC day, Batch API work included; past it: 429 insufficient_quota "
                                "until midnight UTC. Restored from the usage store when raylm restarts.")

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day))


class UsageConfig(_Frozen):
    """Usage per request (tenant, key id, model, tokens, status, times), kept in a database: docs/usage.md."""

    enabled: bool = Field(True, description="Keep usage. Off: no usage store, and no quotas can be set.")
    database: str | None = Field(
        None, description="An SQLite file's path, or a SQLAlchemy URL (`sqlite:////path`, `postgresql://user@host/db`)."
                          " Default: <cache_dir>/usage.db on the head node.")
    required: bool = Field(
        True, description="A database that cannot be reached at start stops `raylm serve` with the reason. "
                          "False: a warning, and usage is buffered until it can be written.")
    flush_interval_s: float = Field(1.0, gt=0, le=60, description="How often buffered usage is written.")
    max_buffered: int = Field(
        100_000, ge=1000, description="Records held while the database is slow or down; past it the oldest are "
                                      "dropped (counted in raylm_usage_dropped_total).")


class AccessLogConfig(_Frozen):
    """One JSON line per request in <Ray session logs>/raylm/access.log: never prompts, outputs or keys."""

    enabled: bool = Field(True, description="Write the access log (it needs `usage.enabled`).")
    stdout: bool = Field(False, description="Also print each line on `raylm serve`'s console.")
    max_bytes: int = Field(100 * 2**20, ge=2**16, description="Size at which the file is rotated.")
    backups: int = Field(5, ge=0, description="Rotated files kept (access.log.1, ...).")


class HTTPConfig(_Frozen):
    """What the HTTP edge reads and holds for a client before auth runs (serve/edge/limits.py). Defaults follow
    nginx and vLLM's launcher: a request head of at most 8 KiB of request line and 64 KiB in all (vLLM
    allows 4 MiB), 128 headers (vLLM 256), sent within 10 s (nginx 60 s)."""

    max_request_line_bytes: int = Field(8192, ge=256, description="Longest request line (method, path, query); "
                                                                   "longer: 414.")
    max_header_bytes: int = Field(65536, ge=1024, description="Largest request head (line and headers); "
                                                             "larger: 431.")
    max_header_count: int = Field(128, ge=8, description="Most headers in one request; more: 431.")
    header_timeout_s: float = Field(10.0, gt=0, description="A connection must send a whole request head within "
                                                            "this long of connecting (or of its first byte on a "
                                                            "kept-alive connection); else 408 and closed.")
    keep_alive_s: float = Field(30.0, gt=0, description="An idle kept-alive connection is closed after this long.")
    body_timeout_s: float = Field(30.0, gt=0, description="A request body that sends no byte for this long: 408.")
    write_timeout_s: float = Field(
        10.0, gt=0, le=60, description="A client that takes none of its answer for this long is cut off, and its "
                                       "engine request aborted: a stalled reader never holds an engine slot.")
    send_buffer_bytes: int = Field(
        256 * 1024, ge=16384, description="The kernel's send buffer of each client connection (it doubles it): "
                                          "what a client that stops reading holds there, instead of the MiBs "
                                          "autotuning allows. Streams need far less; raise it for big answers "
                                          "to distant clients.")
    max_connections: int = Field(8192, ge=1, description="Open connections the ingress holds in all; beyond: 503.")
    max_connections_per_client: int = Field(
        512, ge=1, description="Open connections from one client address; beyond: 503. A proxy in front of "
                                "raylm is one client: raise this for it.")


class LoraConfig(_Frozen):
    """LoRA adapters on one base model (vLLM's --enable-lora): limits of each replica's engine, and where an
    admin may load adapters from at run time (POST /v1/load_lora_adapter)."""

    max_loras: int = Field(1, ge=1, description="Adapters in one engine batch (vLLM's max_loras): requests "
                                                "for more adapters than this wait for a step of their own.")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="Largest adapter rank the engine takes (vLLM's max_lora_rank); a higher-ranked adapter "
                        "is a config error naming it.")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters each replica keeps loaded; past it the least recently used one is "
                                "evicted (and loaded again from its folder when asked for). Default: max_loras.")
    load_dirs: tuple[Path, ...] = Field(
        (), description="Folders whose adapters an admin key may load at run time; none: run-time loading is "
                        "off. Only folders under these (symlinks resolved), never a download.")

    @model_validator(mode="after")
    def _enough_cpu_slots(self) -> LoraConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        return self

    @property
    def held(self) -> int:
        """Adapters one replica holds at once."""
        return self.max_cpu_loras or self.max_loras


class ModelConfig(_Frozen):
    name: str = Field(description="Name clients put in the request's `model` field.")
    source: str = Field(description=f"Weights: `{BUNDLED_PREFIX}<name>` ({SMOLLM2}, {MINILM}), "
                                    "a local folder, or an HF id (read offline from the HF cache).")
    task: Literal["generate", "embed"] = Field(
        "generate", description="`generate` serves chat/completions; `embed` serves embeddings.")
    replicas: int = Field(1, ge=1, description="Number of Serve replicas, each with its own engine.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs Ray reserves for each replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine/serve arguments, passed untouched (vLLM's names, e.g. max_model_len).")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of each replica process, e.g. VLLM_CPU_OMP_THREADS_BIND, "
                    "VLLM_CPU_KVCACHE_SPACE.")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig,
                                       description="What each replica runs, queues and refuses.")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Scale with traffic between min and max replicas (replaces `replicas`).")
    health: HealthConfig = Field(default_factory=HealthConfig,
                                 description="How a stalled or dead engine is detected.")
    warm_workers: int | None = Field(
        None, ge=0, description="Idle Ray workers kept on each node that runs the model, with torch and vLLM "
                                "imported, for its next replica (scale-up, scale from zero, a dead one replaced): "
                                "it skips ~15 s of imports. Each holds ~0.6 GiB. Default: 1 for a model that "
                                "autoscales, else 0 (serve/replica/warm.py).")
    routing: Literal["default", "prefix", "kv"] = Field(
        "default", description="How the ingress picks a replica. `default`: Serve's power of two choices (the "
                               "shorter queue of two random replicas), counting the requests it has chosen a "
                               "replica for and not yet sent, so a burst spreads. `prefix`: requests sharing a "
                               "prompt start (a system prompt, a chat's earlier turns) go to the replica that "
                               "already holds it in vLLM's prefix cache, unless its queue is much longer "
                               "(serve/edge/routing.py). `kv`: the same, matched against what each "
                               "replica's engine reports it holds (vLLM's KV cache events: evictions "
                               "included; serve/edge/kv_events.py). "
                               "Matters with more than one replica.")

    tool_call_parser: str | None = Field(
        None, description="vLLM's tool parser for the calls this model writes (e.g. `hermes`, `llama3_json`; "
                          "which fits which model: docs/tools.md). Set, requests' `tools` work: a named or "
                          "`required` tool_choice is forced to a call whose arguments match the tool's schema.")
    enable_auto_tool_choice: bool | None = Field(
        None, description="`tool_choice: auto` (OpenAI's default with tools): the calls the model chooses to "
                          "write are returned as `tool_calls`. Default: on with a tool_call_parser.")
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter", description="What vLLM's structured output forces on a tool call (with a tool_call_parser). "
                                 "`parameter`: the call's envelope and its arguments' JSON schema, so a named or "
                                 "required call is valid (OpenAI's promise); `function`: the envelope only; "
                                 "`auto` (vLLM's default): arguments only for tools marked `strict`.")
    reasoning_parser: str | None = Field(
        None, description="vLLM's reasoning parser (e.g. `deepseek_r1`, `qwen3`): the model's reasoning is "
                          "returned apart from its answer, as `reasoning` (and its streamed deltas).")
    chat_template: Path | None = Field(
        None, description="A Jinja chat template file replacing the model's own (on every node that runs it).")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served on this model, by name (what a request puts in "
                                          "`model`) → source: a PEFT adapter folder (on every node that runs "
                                          "the model), or an HF id read offline from the HF cache.")
    lora: LoraConfig | None = Field(
        None, description="LoRA limits and run-time loading (docs/lora.md). Set, or `adapters` given, the "
                          "engine serves adapters.")

    @model_validator(mode="before")
    @classmethod
    def _typed_serving_args(cls, data: Any) -> Any:
        """vLLM's tool and reasoning arguments given in engine_args are taken as the typed fields (checked)."""
        if not isinstance(data, dict) or not isinstance(data.get("engine_args"), dict):
            return data
        args = {k.replace("-", "_"): v for k, v in data["engine_args"].items()}
        lifted = {k: args.pop(k) for k in SERVING_ARGS if k in args}
        for key in lifted:
            if data.get(key) is not None:
                raise ValueError(f"`{key}` is set both as a field and in engine_args: keep the field")
        return {**data, **lifted, "engine_args": args} if lifted else data

    @model_validator(mode="after")
    def _engine_batch(self) -> ModelConfig:
        """An unset admission.max_running follows the engine's batch: engine_args' max_num_seqs, else vLLM's own
        batch with GPUs (a GPU replica at a CPU's 32 would leave most of its throughput unused), less burst."""
        if "max_running" in self.admission.model_fields_set:
            return self
        args = self.engine_args
        seqs = args.get("max_num_seqs", args.get("max-num-seqs", GPU_MAX_NUM_SEQS if self.num_gpus else None))
        if isinstance(seqs, int) and not isinstance(seqs, bool) and seqs > 0:
            running = max(1, seqs - self.admission.burst)  # (frozen: set once, here)
            object.__setattr__(self, "admission", self.admission.model_copy(update={"max_running": running}))
        return self

    @model_validator(mode="after")
    def _one_replica_rule(self) -> ModelConfig:
        if self.autoscaling is not None and self.replicas != 1:
            raise ValueError("set either `replicas` or `autoscaling`, not both")
        return self

    @model_validator(mode="after")
    def _known_parsers(self) -> ModelConfig:
        for field, kind, plugin in (("tool_call_parser", "tool", "tool_parser_plugin"),
                                    ("reasoning_parser", "reasoning", "reasoning_parser_plugin")):
            name, known = getattr(self, field), parser_names(kind)
            if name is not None and known and name not in known and plugin not in self.engine_args:
                raise ValueError(f"{field} {name!r} of model {self.name!r} is not one of vLLM's: "
                                 f"{', '.join(sorted(known))}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(f"enable_auto_tool_choice of model {self.name!r} needs a tool_call_parser")
        if self.chat_template is not None and not self.chat_template.is_file():
            raise ValueError(f"chat_template of model {self.name!r}: no file {self.chat_template}")
        return self

    @model_validator(mode="after")
    def _adapters_fit(self) -> ModelConfig:
        if (self.adapters or self.lora) and self.task != "generate":
            raise ValueError(f"model {self.name!r}: LoRA adapters need a generate model")
        if self.name in self.adapters:
            raise ValueError(f"adapter {self.name!r} has the name of its base model")
        adapter_folders(self.adapters, self.lora_limits.max_lora_rank)
        return self

    @property
    def spares(self) -> int:
        """Warm workers kept for the model's next replica (`warm_workers`)."""
        if self.warm_workers is not None:
            return self.warm_workers
        scaling = self.autoscaling
        return int(scaling is not None and scaling.max_replicas > scaling.min_replicas)

    @property
    def lora_limits(self) -> LoraConfig:
        return self.lora or LoraConfig()

    @property
    def serves_adapters(self) -> bool:
        return bool(self.adapters) or self.lora is not None

    def serving_args(self) -> dict[str, Any]:
        """The typed fields as vLLM's serve arguments (only those set)."""
        if self.tool_call_parser is None:
            args: dict[str, Any] = {}
        else:
            args = {"tool_call_parser": self.tool_call_parser, "tool_strict_level": self.tool_strict_level,
                    "enable_auto_tool_choice": self.enable_auto_tool_choice is not False}
        if self.reasoning_parser is not None:
            args["reasoning_parser"] = self.reasoning_parser
        if self.chat_template is not None:
            args["chat_template"] = str(self.chat_template)
        return {**args, **self.lora_args()}

    def lora_args(self) -> dict[str, Any]:
        """vLLM's engine arguments for serving this model's adapters (none without)."""
        if not self.serves_adapters:
            return {}
        lora = self.lora_limits
        return {"enable_lora": True, "max_loras": lora.max_loras, "max_lora_rank": lora.max_lora_rank,
                "max_cpu_loras": lora.held}


class ServeConfig(_Frozen):
    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "haproxy" in data:
            raise ValueError("serve.haproxy was removed: the ingress serves HTTP itself and streams skip Serve's "
                             "proxy (faster than HAProxy was); delete the key")
        return data

    host: str = Field("127.0.0.1", description="HTTP bind address. Loopback unless told otherwise; another "
                                                "address needs API keys (or allow_anonymous).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    address: str | None = Field(
        None, description="Ray cluster to join (`auto` or `host:port`); none starts a local one.")
    num_cpus: float | None = Field(
        None, gt=0, description="Logical CPUs of a local Ray cluster started by raylm (default: cores).")
    ready_timeout_s: float = Field(600.0, gt=0, description="How long to wait for replicas to start.")
    cache_dir: Path = Field(default_factory=default_cache_dir,
                            description="Where converted bundled models are kept.")
    api_keys: tuple[APIKey, ...] = Field(
        (), description="Accepted API keys; with none (and no file) the API is open.")
    api_keys_file: Path | None = Field(
        None, description="File of `tenant:key` lines (`#` comments), read when the app is built.")
    allow_anonymous: bool = Field(
        False, description="Serve a non-loopback `host` without API keys: anyone who reaches the port may use "
                           "every model, as any tenant. Off: such a config refuses to start.")
    admin_tenants: tuple[str, ...] = Field(
        (), description="Tenants whose keys are admin keys: /status shows them every tenant, replica PIDs and "
                        "deployment messages (others see their own tenant's figures).")
    allowed_hosts: tuple[str, ...] | None = Field(
        None, description="Host header values accepted (`name`, `*.domain`, `*`; ports ignored), against DNS "
                          "rebinding. Default: loopback names when `host` is loopback, any otherwise (keys guard it).")
    allowed_origins: tuple[str, ...] = Field(
        (), description="Browser origins (e.g. https://app.example.com) allowed to call the API cross-site, with "
                        "CORS; a request with another Origin than the server's own gets 403.")
    tenant_header: str = Field(
        "x-raylm-tenant", description="Header naming the tenant's queue when auth is off (with auth, the key "
                                      "does); it never reaches another tenant's files or batches.")
    cache_salt: bool = Field(
        True, description="With API keys, salt each tenant's prefix cache (vLLM's cache_salt) so that time to "
                          "first token does not tell one tenant what another asked.")
    http: HTTPConfig = Field(default_factory=HTTPConfig, description="Limits of the HTTP edge.")
    tenants: dict[str, TenantConfig] = Field(
        default_factory=dict, description="Weights and priorities by tenant; others get weight 1, priority 0.")
    cold_start_timeout_s: float = Field(
        120.0, gt=0, description="How long a request waits for a replica to take it (e.g. a model scaled "
                                 "to zero starting up) before 503.")
    drain_s: float = Field(
        30.0, gt=0, description="A replica leaving (a changed config, a scale-down, a node drained) takes no new "
                                "requests and finishes its running ones for up to this long; what is left then "
                                "goes on on another replica (streams resumed, whole requests sent again). An "
                                "ingress replica leaving also waits, as long again at most, for its successor "
                                "to serve the port first.")
    resume_streams: bool = Field(
        True, description="A stream cut by its replica's end (killed, its engine failed) goes on on another "
                          "replica from where its client is, when its request allows (docs/serve.md); off: it "
                          "ends with an error event.")
    max_request_bytes: int = Field(16 * 2**20, ge=1024, description="Largest request body accepted; larger "
                                                                    "ones get 413.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress (auth, routing, retry).")
    ingress_num_cpus: float = Field(0.1, ge=0, description="Logical CPUs each ingress replica reserves.")
    batch_dir: Path | None = Field(
        None, description="Where the Batch API keeps files and batches (default: <cache_dir>/batches). It must "
                          "outlive `raylm serve`: a restarted service finishes the batches it finds there.")
    batch_max_file_bytes: int = Field(200 * 2**20, ge=1, description="Largest file `POST /v1/files` takes (413).")
    batch_max_requests: int = Field(50_000, ge=1, description="Most lines (requests) in one batch's input file.")
    batch_max_stored_bytes: int = Field(
        2 * 2**30, ge=1, description="Bytes of Batch API files (uploads and results) one tenant may keep; an upload "
                                     "past it is cut off with 429 insufficient_quota.")
    batch_max_files: int = Field(1000, ge=1, description="Batch API files one tenant may keep (429 past it).")
    batch_max_in_progress: int = Field(16, ge=1, description="Batches of one tenant not yet finished (429 past it).")
    batch_file_ttl_s: int = Field(
        30 * 24 * 3600, ge=3600, description="Files expire this long after they are made unless an upload asks "
                                             "for less (`expires_after`, as OpenAI's files API); then they are "
                                             "deleted.")
    usage: UsageConfig = Field(default_factory=UsageConfig, description="Usage per request, kept.")
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig, description="The access log.")
    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry traces: an OTLP/HTTP receiver's base URL (e.g. http://127.0.0.1:4318; spans "
                          "go to <it>/v1/traces). Unset: no tracing, at no cost.")
    metrics_port: int = Field(
        8080, ge=1, le=65535, description="Prometheus endpoint (Ray's metrics export) of the local Ray "
                                          "cluster raylm starts; Ray's agent listens on all interfaces, like "
                                          "Ray's other ports. A joined cluster exports on its own port.")

    @model_validator(mode="after")
    def _quotas_need_usage(self) -> ServeConfig:
        limited = sorted(name for name, t in self.tenants.items() if t.limited)
        if limited and not self.usage.enabled:
            raise ValueError(f"tenants {', '.join(limited)} have quotas, which count usage: "
                             "set serve.usage.enabled: true (or remove the quotas)")
        if self.otlp_endpoint is not None and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"serve.otlp_endpoint must be an http(s) URL, not {self.otlp_endpoint!r}")
        return self

    @model_validator(mode="after")
    def _fail_closed(self) -> ServeConfig:
        keyed = bool(self.api_keys) or self.api_keys_file is not None
        if not keyed and not is_loopback(self.host) and not self.allow_anonymous:
            raise ValueError(
                f"serve.host {self.host} is reachable from other machines and no API keys are set: anyone who "
                "reaches it could use every model as any tenant. Set serve.api_keys or serve.api_keys_file, or "
                "serve.allow_anonymous: true to serve it open on purpose")
        return self

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def usage_database(self) -> str:
        """Where usage is kept: usage.database, else an SQLite file in cache_dir (on the head node)."""
        return self.usage.database or str(Path(self.cache_dir).expanduser() / "usage.db")


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_models() -> tuple[ModelConfig, ...]:
    """The bundled pair: SmolLM2 for chat/completions, all-MiniLM-L6-v2 for embeddings, on the CPU.

    dtype and OpenMP binding are left to the replica, which fits them to its machine (hardware.py); the
    embedding engine shares the cores: it is idle most of the time.
    """
    return (
        ModelConfig(name=SMOLLM2, source=f"{BUNDLED_PREFIX}{SMOLLM2}", num_cpus=1.0,
                    # Eager: torch.compile on 2 cores adds ~100 s to a cold start. Greedy where a request
                    # sets no temperature (vLLM's generation config): 10 factual questions x 4 seeds, right
                    # answers / answers looping to 200 tokens: temperature 0 36/40, 3; the model card's
                    # 0.2 + top_p 0.9 32/40, 8; vLLM's 1.0 answered noise.
                    engine_args={"max_model_len": 4096, "enforce_eager": True,
                                 "override_generation_config": {"temperature": 0.0}},
                    # Its template does not show tools to the model; forced (named, required) calls still
                    # come out valid, in Hermes' <tool_call> format that vLLM's structured output writes.
                    tool_call_parser="hermes",
                    env={"VLLM_CPU_KVCACHE_SPACE": "2"}),
        ModelConfig(name=MINILM, source=f"{BUNDLED_PREFIX}{MINILM}", task="embed", num_cpus=0.5,
                    engine_args={"enforce_eager": True}, env={"VLLM_CPU_KVCACHE_SPACE": "1"}),
    )


class DataConfig(_Frozen):
    """`raylm data` jobs. Their models come from the same tree as `raylm serve`: a model named here that is
    one of `models` brings its source, engine arguments, environment and resources along."""

    text_column: str = Field("text", description="Input column holding the text.")
    output_format: Literal["parquet", "jsonl"] = Field("parquet", description="Format of OUT's files.")
    batch_size: int = Field(256, ge=1, description="Rows per block handed to a stage, at least (a large input's "
                                                   "blocks grow to 16 times it, four per stage actor).")
    concurrency: int = Field(1, ge=1, description="Actors in the stage's pool (each loads the model once).")
    num_cpus: float | None = Field(
        None, gt=0, description="Logical CPUs each embed/generate stage actor reserves (default: the model's "
                                "num_cpus, 1 for a model not in `models`); tokenize actors reserve 1.")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs each embed/generate stage actor reserves (default: the model's num_gpus, "
                                "0 for a model not in `models`).")
    tokenizer: str = Field(SMOLLM2, description="`data tokenize`: a model's name in `models`, or a source.")
    embed_model: str = Field(MINILM, description="`data embed`: a model's name in `models`, or a source "
                                                 "(bundled:, a folder, an HF id).")
    generate_model: str = Field(SMOLLM2, description="`data generate`: a model's name in `models`, or a source.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments of the embed and generate stages, over the model's own (a model "
                    "not in `models` starts from enforce_eager: true); passed untouched, and what is set "
                    "here or in the model wins over what raylm fits to the machine (dtype, threads).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment of the stage actors, over the model's `env`.")


# A data stage's model that is not one of `models`: eager, as the bundled ones (compiling on a small CPU
# costs more than it saves on a batch job).
_DATA_ENGINE_ARGS = {"enforce_eager": True}
# ...and with a bounded KV cache on a CPU (vLLM's own default asks for 92% of the machine's memory).
_DATA_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


class AppConfig(_Frozen):
    models: tuple[ModelConfig, ...] = Field(
        default_factory=default_models,
        description="Served models, each its own Serve deployment; a request names one in `model` (a request "
                    "without one goes to the first model that serves its route).")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The online service.")
    data: DataConfig = Field(default_factory=DataConfig, description="`raylm data` pipelines.")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        if not models:
            raise ValueError("at least one model is required")
        names = [m.name for m in models] + [a for m in models for a in m.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model or adapter names: {', '.join(dupes)}")
        return models

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def adapter_base(self, name: str) -> ModelConfig | None:
        """The model whose `adapters` name this one."""
        return next((m for m in self.models if name in m.adapters), None)

    def data_model(self, ref: str, task: Literal["generate", "embed"] | None) -> ModelConfig:
        """The model a data stage runs: `ref` names one of `models` (its source, engine arguments, env and
        resources) or an adapter of one (that model, LoRA on), else it is a source; `data`'s engine_args, env
        and resources go on top. `task` None: any model (a tokenizer's)."""
        data = self.data
        model = self.model(ref) or self.adapter_base(ref) or next((m for m in default_models() if m.name == ref), None)
        if model is None:
            model = ModelConfig(name=_name_of(ref), source=ref, task=task or "generate",
                                engine_args=_DATA_ENGINE_ARGS, env=_DATA_ENV)
        elif task is not None and model.task != task:
            raise ValueError(f"model {ref!r} is a {model.task} model; this job needs a {task} model")
        resources = {k: v for k, v in (("num_cpus", data.num_cpus), ("num_gpus", data.num_gpus)) if v is not None}
        return model.model_copy(update={"engine_args": {**model.engine_args, **model.lora_args(), **data.engine_args},
                                        "env": {**model.env, **data.env}, **resources})


def load_config(path: str | Path | None = None, *, model: str | None = None,
                replicas: int | None = None, data: dict[str, Any] | None = None, **serve: Any) -> AppConfig:
    """Read a YAML file (or the defaults), then apply CLI overrides; every value is validated.

    `model` replaces the first model's source (and name); `replicas` sets every model's replica count;
    `data` and `serve` keys override those sections (None means "not given").
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:  # a typo in the file: the same clear refusal as a bad value
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    for section, values in (("serve", serve), ("data", data or {})):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            tree[section] = {**(tree.get(section) or {}), **given}
    if model is not None or replicas is not None:
        models = [m.model_dump() for m in AppConfig.model_validate(tree).models]
        if model is not None:
            # Engine arguments, parsers and adapters belong to the old weights; resources and environment stay.
            models[0] = {**models[0], "name": _name_of(model), "source": model, "engine_args": {},
                         **{k: ModelConfig.model_fields[k].default for k in SERVING_ARGS}, "adapters": {},
                         "lora": None}
        if replicas is not None:
            for m in models:
                m.update(replicas=replicas, autoscaling=None)
        tree["models"] = models
    return AppConfig.model_validate(tree)


def _name_of(source: str) -> str:
    return source.removeprefix(BUNDLED_PREFIX).rstrip("/").split("/")[-1]
