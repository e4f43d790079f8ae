"""The OpenAI Batch API: a batch is a `raylm data` job whose stage sends each line to the served models.

    POST /v1/batches ─► BatchJobs (one replica, on the head node, next to batch_dir)
                          validating: the input file is the tenant's, its lines are counted
                          in_progress: run_job(input.txt → out/), stage BatchRequests in a Ray Data actor:
                              each line ─► the model's Serve handle, as the tenant's batch work (admission's
                              lowest class: refused while others wait, retried here) ─► its answer
                          finalizing: out/data → the output file, out/errors → the error file, by line
                          completed | cancelled | expired (a line not run: `batch_cancelled`/`batch_expired`)

Restart-safe as `raylm data` is: answers are written block by block, each file whole, and a restarted
deployment resumes every unfinished batch it finds in batch_dir, skipping the lines already answered, so each
line is answered exactly once. A malformed line fails that line (in the error file), never the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray import serve

from raylm import _ray, errors
from raylm.config import ModelConfig, ServeConfig
from raylm.contract import LEDGER_NAME, Adapter, Call, Reply, Tenant, Usage, UsageRecord, deployment_name
from raylm.data import io
from raylm.serve.batch.store import TENANT, Store, new_id, page, public, request_lines
from raylm.serve.edge.adapters import served_adapters
from raylm.serve.usage.sink import UsageSink

logger = logging.getLogger("raylm.serve")

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
COMPLETION_WINDOWS_S = {"24h": 24 * 3600}  # OpenAI's completion_window values
LINE = "line"  # the input's column: each line as text, parsed by the stage (a bad line fails alone)
INPUT = "input.txt"  # the input file's lines (.txt: raylm data reads each line as the text column)
# Answers are saved (and a restart resumes) a block at a time: a batch is cut into about BLOCKS blocks of
# LINES_PER_BLOCK lines. Each block costs Ray Data ~45 ms of CPU in this deployment (measured, 2 cores)
# and a read and a write task: 16-line blocks at 50 lines/s spent a third of a core (of 2) on them.
BLOCKS, LINES_PER_BLOCK = 64, (16, 256)
DEFERRED_RETRY_S = (0.2, 2.0)  # a deferred line is tried again after 0.2 s, doubling up to 2 s
FINAL = ("completed", "failed", "expired", "cancelled")
SWEEP_S = 600.0  # expired files are deleted at least this often


class BatchRequests:
    """Ray Data stage: input lines → `custom_id`, `status_code`, `response` (the body, JSON text), `request_id`,
    `error`.

    Serve's handles here run their router in the caller's event loop: the stage keeps one loop in a thread
    and sends `in_flight` lines at a time through it: as many as admission lets run, so few are refused. The
    actor takes several blocks at once (one thread each) and they all share that one limit, so
    the models never wait for a block's slowest line, or for Ray Data to hand over the next block."""

    def __init__(self, app_name: str, deployments: dict[str, str], endpoint: str, tenant: Tenant,
                 folder: str, expires_at: float, in_flight: int, max_line_bytes: int,
                 adapters: dict[str, tuple[str, Adapter]], usage: bool = False) -> None:
        self.endpoint, self.tenant, self.folder, self.expires_at = endpoint, tenant, Path(folder), expires_at
        self.adapters = adapters  # name → (base model, adapter): as the service served them when the batch began
        self.max_line_bytes = max_line_bytes
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="batch-requests", daemon=True).start()

        async def handles() -> tuple[dict[str, Any], asyncio.Semaphore, UsageSink | None]:
            # Each line's usage goes to the Ledger as the ingress's does; sent at the end of every block too.
            sink = UsageSink(serve.get_deployment_handle(LEDGER_NAME, app_name), 1.0, 100_000) if usage else None
            return ({model: serve.get_deployment_handle(name, app_name).options(stream=True)
                     for model, name in deployments.items()}, asyncio.Semaphore(in_flight), sink)
        self.handles, self.gate, self.usage = asyncio.run_coroutine_threadsafe(handles(), self.loop).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        lines = batch[LINE].to_pylist() if LINE in batch.column_names else [None] * len(batch)
        answers = asyncio.run_coroutine_threadsafe(self._answers(lines), self.loop).result()
        if self.usage is not None:
            asyncio.run_coroutine_threadsafe(self.usage.flush(), self.loop).result()
        for name in ("custom_id", "status_code", "response", "request_id", io.ERROR):
            kind = pa.int32() if name == "status_code" else pa.string()
            column = pa.array([a.get(name) for a in answers], kind)
            batch = batch.drop_columns([name]) if name in batch.column_names else batch
            batch = batch.append_column(name, column)
        return batch

    async def _answers(self, lines: list[str | None]) -> list[dict[str, Any]]:
        async def one(line: str | None) -> dict[str, Any]:
            async with self.gate:  # shared by the blocks this actor runs at once
                return await self._answer(line)
        return await asyncio.gather(*(one(line) for line in lines))

    async def _answer(self, line: str | None) -> dict[str, Any]:
        if line is not None and len(line.encode()) > self.max_line_bytes:
            return _line_error("request_too_large", f"the line is larger than {self.max_line_bytes:,} bytes "
                                                    "(serve.max_request_bytes)")
        try:
            request = json.loads(line or "")
        except ValueError as exc:
            return _line_error("invalid_json", f"line is not JSON: {exc}")
        if not isinstance(request, dict):
            return _line_error("invalid_request", "a line must be a JSON object")
        custom_id = request.get("custom_id")
        problem = _check_line(request, self.endpoint)
        if problem:
            return _line_error("invalid_request", problem, custom_id)
        body = {k: v for k, v in request["body"].items() if k not in ("stream", "stream_options")}
        model = body.get("model")
        base, adapter = (model, None) if model in self.handles else self.adapters.get(model, (None, None))
        handle = self.handles.get(base)
        if handle is None:
            err = errors.NotFoundError(f"The model `{body.get('model')}` does not exist", param="model",
                                       code="model_not_found")
            return {"custom_id": custom_id, "status_code": err.status, "response": json.dumps(err.body()),
                    io.ERROR: err.message}
        rid, began, start = new_id("req_"), time.time(), time.perf_counter()
        reply = await self._send(handle, Call(ENDPOINTS[self.endpoint], body, rid, self.tenant, adapter), custom_id)
        if isinstance(reply, dict):
            return reply
        if self.usage is not None:
            u = reply.usage or Usage()
            self.usage.add(UsageRecord(began, rid, self.tenant.name, "", base, adapter.name if adapter else "",
                                       ENDPOINTS[self.endpoint], reply.status, reply.code or "", u.prompt_tokens,
                                       u.cached_tokens, u.completion_tokens, None, time.perf_counter() - start,
                                       batch=True, replica=u.replica))
        answer = {"custom_id": custom_id, "status_code": reply.status, "response": reply.body.decode(),
                  "request_id": rid}
        if not reply.ok:
            answer[io.ERROR] = reply.message
        return answer

    async def _send(self, handle: Any, call: Call, custom_id: str) -> Reply | dict[str, Any]:
        """The line's answer; refusals for capacity (batch work waits for free slots) are tried again. While
        interactive traffic keeps a replica busy, deferred lines back off: their retries are work too."""
        deferred = DEFERRED_RETRY_S[0]
        while True:
            stop = self._stopped(custom_id)
            if stop:
                return stop
            try:
                replies = handle.reply.remote(call)
                reply = await replies.__anext__()
                async for _ in replies:  # a Reply is the call's one item: this only ends the call
                    pass
            except Exception as exc:  # the replica died or Serve refused: the line did not run; try again
                logger.info("batch line %s: %r; trying again", custom_id, exc)
                await asyncio.sleep(1.0)
                continue
            if reply.status not in (429, 503):
                return reply
            if reply.code == "batch_deferred":
                await asyncio.sleep(deferred)
                deferred = min(2 * deferred, DEFERRED_RETRY_S[1])
            else:
                await asyncio.sleep(min(5.0, float(reply.headers.get("Retry-After", 1))))

    def _stopped(self, custom_id: str) -> dict[str, Any] | None:
        if (self.folder / "cancel").exists():
            return _line_error("batch_cancelled", "the batch was cancelled before this request ran", custom_id)
        if time.time() > self.expires_at:
            return _line_error("batch_expired", "the batch expired before this request ran", custom_id)
        return None


def _check_line(request: dict, endpoint: str) -> str | None:
    if not isinstance(request.get("custom_id"), str):
        return "custom_id must be a string"
    if request.get("method") != "POST":
        return "method must be POST"
    if request.get("url") != endpoint:
        return f"url must be the batch's endpoint, {endpoint}"
    if not isinstance(request.get("body"), dict):
        return "body must be a JSON object"
    return None


def _line_error(code: str, message: str, custom_id: Any = None) -> dict[str, Any]:
    """A line that was not run: in the error file with `error` set and no response, as OpenAI writes it."""
    return {"custom_id": custom_id if isinstance(custom_id, str) else None,
            io.ERROR: json.dumps({"code": code, "message": message})}


class BatchJobs:
    """Creates, runs, cancels and resumes batches; the ingress forwards the Batch API's writes here."""

    async def __init__(self, models: tuple[ModelConfig, ...], tenants: dict[str, Tenant],
                       config: ServeConfig) -> None:
        """`config`: serve.*, with batch_dir resolved and without keys."""
        self.store = Store(Path(config.batch_dir))
        self.models = {m.name: m for m in models}
        self.tenants = tenants
        self.config = config
        self.app_name = serve.get_replica_context().app_name
        self.tasks: dict[str, asyncio.Task] = {}
        # Lines per part file of each running batch's out/: a part is written whole, once (SplitSink), so each
        # is counted once, not at every poll (reading every answer so far at each poll made a 50,000-line
        # batch's polls cost more the further it got).
        self._lines: dict[str, dict[str, int]] = {}
        for record in self.store.batches():
            if record["status"] not in FINAL:  # the service stopped while it ran: finish it
                logger.info("resuming batch %s (%s)", record["id"], record["status"])
                self._start(record)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Expired files go, whether or not anyone looks for them."""
        while True:
            try:
                await asyncio.to_thread(self.store.files, None)
            except Exception as exc:  # the sweep is housekeeping: never worth the deployment
                logger.warning("sweeping expired batch files failed: %r", exc)
            await asyncio.sleep(SWEEP_S)

    async def create(self, tenant: str, body: dict) -> dict[str, Any]:
        endpoint, window = body.get("endpoint"), body.get("completion_window", "24h")
        if endpoint not in ENDPOINTS:
            raise errors.InvalidRequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if window not in COMPLETION_WINDOWS_S:
            raise errors.InvalidRequestError("completion_window must be 24h", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise errors.InvalidRequestError("metadata must be an object", param="metadata")
        running = sum(r["status"] not in FINAL for r in self.store.batches(tenant))
        if running >= self.config.batch_max_in_progress:
            raise errors.OverloadedError(f"this tenant has {running} batches not yet finished, the most it may "
                                         "(serve.batch_max_in_progress); retry when one has finished",
                                         code="rate_limit_exceeded", retry_after=60)
        file = self.store.file(tenant, str(body.get("input_file_id")))
        if file["purpose"] != "batch":
            raise errors.InvalidRequestError(f"file {file['id']} has purpose {file['purpose']}, not batch",
                                             param="input_file_id")
        requests = request_lines(self.store.file_path(tenant, file["id"]).read_bytes())
        lines = len(requests)
        if lines > self.config.batch_max_requests:
            raise errors.InvalidRequestError(f"the input file has {lines} requests; a batch takes at most "
                                             f"{self.config.batch_max_requests}", param="input_file_id",
                                             code="too_many_requests")
        if lines == 0:
            raise errors.InvalidRequestError("the input file holds no requests", param="input_file_id")
        now = int(time.time())
        record = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
                  "input_file_id": file["id"], "completion_window": window, "status": "validating",
                  "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                  "expires_at": now + COMPLETION_WINDOWS_S[window], "finalizing_at": None, "completed_at": None,
                  "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                  "request_counts": {"total": lines, "completed": 0, "failed": 0}, "metadata": metadata,
                  TENANT: tenant}
        folder = self.store.batch_dir(record["id"])
        folder.mkdir()
        (folder / INPUT).write_bytes(b"\n".join(requests))  # kept even if the file is deleted
        self.store.save_batch(record)
        self._start(record)
        return public(record)

    async def retrieve(self, tenant: str, batch_id: str) -> dict[str, Any]:
        return public(await asyncio.to_thread(lambda: self._current(self.store.batch(tenant, batch_id))))

    async def list_batches(self, tenant: str, limit: int, after: str | None) -> dict[str, Any]:
        records = await asyncio.to_thread(lambda: [self._current(r) for r in self.store.batches(tenant)])
        return page(records, limit, after)

    def _current(self, record: dict[str, Any]) -> dict[str, Any]:
        """A running batch's counts are its answers written so far."""
        if record["status"] in ("in_progress", "cancelling"):
            return {**record, "request_counts": self._counts(record)}
        self._lines.pop(record["id"], None)  # a poll that raced _finalize may have counted it again: not kept
        return record

    async def cancel(self, tenant: str, batch_id: str) -> dict[str, Any]:
        record = self.store.batch(tenant, batch_id)
        if record["status"] in ("completed", "failed", "expired"):
            raise errors.InvalidRequestError(f"batch {batch_id} is {record['status']}; it cannot be cancelled",
                                             param="batch_id", code="batch_not_cancellable")
        if record["status"] in ("cancelling", "cancelled"):
            return public(record)
        (self.store.batch_dir(batch_id) / "cancel").touch()
        record.update(status="cancelling", cancelling_at=int(time.time()))
        self.store.save_batch(record)
        return public(record)

    def _start(self, record: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(record["id"], record[TENANT]))
        self.tasks[record["id"]] = task  # held until done: the loop keeps only a weak reference
        task.add_done_callback(lambda _: self.tasks.pop(record["id"], None))

    async def _run(self, batch_id: str, tenant: str) -> None:
        try:
            await asyncio.to_thread(self._execute, batch_id, tenant)
        except Exception as exc:
            logger.exception("batch %s failed", batch_id)
            record = self.store.batch(tenant, batch_id)
            record.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "batch_failed", "message": f"the batch could not run: {type(exc).__name__}",
                 "param": None, "line": None}]})
            self.store.save_batch(record)

    def _execute(self, batch_id: str, tenant: str) -> None:
        record = self.store.batch(tenant, batch_id)
        folder = self.store.batch_dir(batch_id)
        if record["status"] == "validating":
            record.update(status="in_progress", in_progress_at=int(time.time()))
            self.store.save_batch(record)
        if record["status"] in ("in_progress", "cancelling"):
            from raylm.data.job import JobSpec, run_job  # Ray Data: only once a batch runs

            who = self.tenants.get(tenant) or Tenant(tenant)
            spec = JobSpec("batch", str(folder / INPUT), str(folder / "out"), LINE, "jsonl",
                           {"batch": batch_id})
            deployments = {name: deployment_name(name) for name in self.models}
            stage = {"app_name": self.app_name, "deployments": deployments, "endpoint": record["endpoint"],
                     "tenant": Tenant(who.name, who.weight, who.priority, batch=True), "folder": str(folder),
                     "expires_at": record["expires_at"], "max_line_bytes": self.config.max_request_bytes,
                     "in_flight": max(_batch_slots(m) for m in self.models.values()),
                     "adapters": served_adapters(self.models.values(), self.app_name),
                     "usage": self.config.usage.enabled}
            # Reading, the stage and writing stay on this node, next to batch_dir; the stage only waits on
            # the models, so nothing reserves a CPU the engines need. Enough blocks run at once to fill
            # `in_flight` with one more queued: a block waiting on its last lines leaves the others running.
            lines = _block_lines(record["request_counts"]["total"])
            run_job(spec, BatchRequests, stage, num_cpus=0.0, read_num_cpus=0.0, batch_size=lines,
                    rows_per_block=lines, calls_per_actor=-(-stage["in_flight"] // lines) + 1,
                    ray_remote_args={"resources": {_ray.HEAD_NODE_RESOURCE: 0.001}})
            record = self.store.batch(tenant, batch_id)
            if record["status"] != "cancelling":
                record.update(status="finalizing", finalizing_at=int(time.time()))
                self.store.save_batch(record)
        self._finalize(record, folder)

    def _finalize(self, record: dict[str, Any], folder: Path) -> None:
        """out/ → the output and error files, in input order; then the final status."""
        answered, failed = _rows(folder / "out" / "data"), _rows(folder / "out" / "errors")
        tenant = record[TENANT]
        output = b"".join(_output_line(r) for r in answered)
        error = b"".join(_output_line(r) for r in failed)
        ttl_s = self.config.batch_file_ttl_s
        if output and not record["output_file_id"]:
            record["output_file_id"] = self.store.create_file(tenant, f"{record['id']}_output.jsonl", "batch_output",
                                                              output, ttl_s)["id"]
        if error and not record["error_file_id"]:
            record["error_file_id"] = self.store.create_file(tenant, f"{record['id']}_error.jsonl", "batch_output",
                                                             error, ttl_s)["id"]
        codes = {json.loads(r[io.ERROR]).get("code") for r in failed if r.get("status_code") is None}
        status = ("cancelled" if record["status"] == "cancelling" or "batch_cancelled" in codes
                  else "expired" if "batch_expired" in codes else "completed")
        now = int(time.time())
        record.update(status=status, **{f"{status}_at": now},
                      request_counts={"total": record["request_counts"]["total"],
                                      "completed": sum(r.get("status_code") == 200 for r in answered),
                                      "failed": len(failed)})
        self.store.save_batch(record)
        # The answers are in the output and error files now: the working copies go (a restart reads the record).
        (folder / INPUT).unlink(missing_ok=True)
        shutil.rmtree(folder / "out", ignore_errors=True)
        self._lines.pop(record["id"], None)

    def _counts(self, record: dict[str, Any]) -> dict[str, int]:
        out, counted = self.store.batch_dir(record["id"]) / "out", self._lines.setdefault(record["id"], {})

        def lines(path: Path) -> int:
            key = f"{path.parent.name}/{path.name}"
            if key not in counted:
                counted[key] = path.read_bytes().count(b"\n")
            return counted[key]
        done = {sub: sum(lines(p) for p in (out / sub).glob("*.jsonl")) for sub in ("data", "errors")}
        return {"total": record["request_counts"]["total"], "completed": done["data"], "failed": done["errors"]}


def _block_lines(total: int) -> int:
    """Lines per block for a batch of `total` lines: about BLOCKS blocks, within LINES_PER_BLOCK."""
    return min(max(LINES_PER_BLOCK[0], -(-total // BLOCKS)), LINES_PER_BLOCK[1])


def _batch_slots(model: ModelConfig) -> int:
    """Batch sequences a model's replicas run at once, at most."""
    replicas = model.autoscaling.max_replicas if model.autoscaling else model.replicas
    return model.admission.batch_max_running * replicas


def _rows(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for p in folder.glob("*.jsonl") for line in p.read_text().splitlines() if line]
    return sorted(rows, key=lambda r: r["_row"])


def _output_line(row: dict[str, Any]) -> bytes:
    """One line of an output or error file, in OpenAI's shape."""
    response = None
    if row.get("status_code") is not None:
        response = {"status_code": row["status_code"], "request_id": row.get("request_id"),
                    "body": json.loads(row["response"])}
    error = json.loads(row[io.ERROR]) if response is None else None
    return (json.dumps({"id": new_id("batch_req_"), "custom_id": row.get("custom_id"), "response": response,
                        "error": error}) + "\n").encode()


BatchDeployment = serve.deployment(BatchJobs)
