"""Which LoRA adapters the service serves, on which model: the config's, and those an admin loaded at run time.

    request `model` ─► a model's name ─► that model
                    ─► an adapter's name ─► its base model's replicas, the Call naming the adapter (contract.Adapter);
                                             the replica loads it on first use (engine.use_adapter)
    POST /v1/load_lora_adapter   {lora_name, lora_path[, model]}  admin key; a folder under the model's lora.load_dirs
    POST /v1/unload_lora_adapter {lora_name}                       admin key; run-time adapters only

Run-time adapters live in Ray's cluster key-value store, one record for the app, so every ingress replica
serves the same set and a restarted ingress finds them. Each ingress reads the record when a name is unknown
or its copy is older than REFRESH_S, at most once per REFRESH_S (a flood of unknown names costs one read a
second), off the request when it already knows the name: an adapter unloaded on one ingress is refused by the
others within REFRESH_S. Two admins loading at the same moment through different ingress replicas: the last
write wins (the other's adapter is not registered; its load answered 200). The record is forgotten with the
cluster (a restart of `raylm serve` starts from the config again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from raylm import _ray, errors
from raylm.adapters import adapter_folders, check_adapter
from raylm.config import ModelConfig
from raylm.contract import Adapter

logger = logging.getLogger("raylm.serve")

REFRESH_S = 1.0
_KEY = "raylm/adapters/"


class Adapters:
    def __init__(self, models: Iterable[ModelConfig], app: str) -> None:
        self.models = {m.name: m for m in models}
        self.key = _KEY + app
        self.static = static_adapters(self.models.values())
        self.runtime: dict[str, tuple[str, Adapter]] = {}
        self._read_at = float("-inf")
        self._reading: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> dict[str, tuple[str, Adapter]]:
        """Every adapter, name → (base model, adapter); the run-time ones read again if older than REFRESH_S."""
        if time.monotonic() - self._read_at > REFRESH_S:
            await self._refresh()
        return {**self.runtime, **self.static}

    async def find(self, name: str) -> tuple[str, Adapter] | None:
        """(base model, adapter) for a name, or None: not an adapter this service serves."""
        if name in self.static:
            return self.static[name]
        if time.monotonic() - self._read_at > REFRESH_S:
            reading = self._refresh()
            if name not in self.runtime:  # known: answered from the copy while it is read again
                await reading
        return self.runtime.get(name)

    def _refresh(self) -> asyncio.Future:
        """One read of the record at a time; every caller meanwhile waits on the same one."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._read())
        return asyncio.shield(self._reading)

    async def _read(self) -> None:
        self._read_at = time.monotonic()
        try:
            raw = await asyncio.to_thread(_ray.kv_get, self.key)
        except Exception as exc:  # the store is GCS: when it is away, the last copy serves
            logger.warning("run-time adapters not read: %r", exc)
            return
        self.runtime = _parse(raw)

    async def load(self, name: str, path: str, model: str | None) -> tuple[str, Adapter]:
        """Register a run-time adapter (checked: a folder under the model's load_dirs, a LoRA of a rank
        that fits); raises an APIError for the client."""
        base = self._base(model)
        if name in self.models or name in self.static:
            raise errors.InvalidRequestError(f"{name!r} is the name of a model or an adapter in the config",
                                             param="lora_name", code="name_taken")
        folder = self._allowed(base, path)
        try:
            check_adapter(name, str(folder), base.lora_limits.max_lora_rank)
        except ValueError as exc:
            raise errors.InvalidRequestError(str(exc), param="lora_path", code="invalid_adapter") from None
        entry = (base.name, Adapter(name, str(folder)))
        await self._update(lambda adapters: adapters.__setitem__(name, entry))
        return entry

    async def unload(self, name: str) -> None:
        if name in self.static:
            raise errors.InvalidRequestError(f"adapter {name!r} is in the config: remove it there",
                                             param="lora_name", code="static_adapter")
        found = []
        await self._update(lambda adapters: found.append(adapters.pop(name, None)))
        if found[0] is None:
            raise errors.NotFoundError(f"no run-time adapter {name!r}", param="lora_name", code="model_not_found")

    async def _update(self, change: Callable[[dict[str, tuple[str, Adapter]]], object]) -> None:
        async with self._lock:
            await self._read()
            adapters = dict(self.runtime)
            change(adapters)
            record = json.dumps({n: {"model": b, "path": a.path} for n, (b, a) in adapters.items()})
            await asyncio.to_thread(_ray.kv_put, self.key, record)
            self.runtime = adapters

    def _base(self, model: str | None) -> ModelConfig:
        loadable = [m for m in self.models.values() if m.lora is not None and m.lora.load_dirs]
        if model is not None:
            found = self.models.get(model)
            if found is None or found not in loadable:
                raise errors.InvalidRequestError(
                    f"model {model!r} takes no run-time adapters (its lora.load_dirs is not set)", param="model")
            return found
        if len(loadable) != 1:
            raise errors.InvalidRequestError(
                "name the base model in `model`: " + (", ".join(m.name for m in loadable) if loadable else
                                                      "none takes run-time adapters (set lora.load_dirs)"),
                param="model")
        return loadable[0]

    @staticmethod
    def _allowed(model: ModelConfig, path: str) -> Path:
        """The folder, if it lies under one of the model's load_dirs once symlinks and `..` are resolved."""
        folder = Path(path).expanduser().resolve()
        roots = [Path(d).expanduser().resolve() for d in model.lora_limits.load_dirs]
        if not any(folder.is_relative_to(root) for root in roots):
            raise errors.PermissionDeniedError(
                f"lora_path is not under a folder model {model.name!r} loads adapters from (lora.load_dirs)",
                param="lora_path", code="path_not_allowed")
        return folder


def static_adapters(models: Iterable[ModelConfig]) -> dict[str, tuple[str, Adapter]]:
    """The config's adapters, name → (base model, adapter), each resolved (a folder, or an HF cache snapshot)."""
    return {name: (m.name, Adapter(name, folder)) for m in models
            for name, folder in adapter_folders(m.adapters, m.lora_limits.max_lora_rank).items()}


def served_adapters(models: Iterable[ModelConfig], app: str) -> dict[str, tuple[str, Adapter]]:
    """Every adapter the service serves now, the run-time ones read from the store (blocking: off a loop)."""
    models = list(models)
    names = {m.name for m in models}
    runtime = {n: e for n, e in _parse(_ray.kv_get(_KEY + app)).items() if e[0] in names}
    return {**runtime, **static_adapters(models)}


def _parse(raw: bytes | None) -> dict[str, tuple[str, Adapter]]:
    if not raw:
        return {}
    return {name: (entry["model"], Adapter(name, entry["path"])) for name, entry in json.loads(raw).items()}
