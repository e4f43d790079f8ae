"""A data job: input files → a stage in a Ray Data actor pool → OUT/data and OUT/errors, resumable.

How resume decides what is done: every output row carries its input id (`_source`, `_row`). Output
files are written whole or not at all (temporary name, then rename), so on a restart the ids in the
files under OUT are exactly the rows that are done; those are filtered out at read time and the rest
is processed. OUT/_raylm_job.json records the job; an OUT holding another job is refused.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from raylm.data import io
from raylm.data.io import ERROR, ID_COLUMNS

JOB_FILE = "_raylm_job.json"
IO_TASKS = 1


@dataclass(frozen=True)
class JobSpec:
    task: str
    input: str
    output: str
    text_column: str = "text"
    output_format: str = "parquet"
    options: dict[str, Any] = field(default_factory=dict)  # what else makes this job this job


@dataclass(frozen=True)
class Summary:
    rows_in: int
    rows_out: int
    rows_failed: int
    rows_skipped: int
    wall_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.wall_s if self.wall_s else 0.0


class JobError(Exception):
    """A job that cannot start: bad input, or an OUT that belongs to something else."""


def claim_output(spec: JobSpec) -> Path:
    out = Path(spec.output)
    record = {"task": spec.task, "input": spec.input, "text_column": spec.text_column,
              "output_format": spec.output_format, "options": spec.options}
    job_file = out / JOB_FILE
    if job_file.exists():
        existing = json.loads(job_file.read_text())
        if existing != json.loads(json.dumps(record)):
            raise JobError(f"{out} holds the output of a different job ({existing}); "
                           "use another OUT or remove it")
    elif out.exists() and any(out.iterdir()):
        raise JobError(f"{out} exists and is not a raylm job output; refusing to write into it")
    for sub in ("data", "errors"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(record, indent=2))
    return out


def done_rows(out: Path) -> dict[str, list[int]]:
    """Input ids already written; half-written temporaries of a killed run are removed."""
    done: dict[str, list[int]] = {}
    for tmp in out.glob("*/*.tmp"):
        tmp.unlink()
    for sub in ("data", "errors"):
        for path in sorted((out / sub).iterdir()):
            ids = _read_ids(path)
            for source, rows in ids.items():
                done.setdefault(source, []).extend(rows)
    return {s: sorted(set(r)) for s, r in done.items()}


def _read_ids(path: Path) -> dict[str, list[int]]:
    if path.suffix == ".parquet":
        table = pq.read_table(path, columns=ID_COLUMNS)
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        table = pa.table({c: [r[c] for r in rows] for c in ID_COLUMNS}) if rows else pa.table({c: [] for c in ID_COLUMNS})
    out: dict[str, list[int]] = {}
    for source, row in zip(table["_source"].to_pylist(), table["_row"].to_pylist()):
        out.setdefault(source, []).append(row)
    return out


class SplitSink(Datasink):
    """Writes each block's good rows to OUT/data and error rows to OUT/errors, each file atomically."""

    def __init__(self, out: Path, fmt: str) -> None:
        self.out, self.fmt = out, fmt
        self.counts = {"rows_out": 0, "rows_failed": 0, "rows_in": 0}

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, int]:
        counts = {"rows_out": 0, "rows_failed": 0, "rows_in": 0}
        ext = "parquet" if self.fmt == "parquet" else "jsonl"
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if not len(table):
                continue
            failed = pc.is_valid(table[ERROR])
            name = f"part-{uuid.uuid4().hex}.{ext}"
            good, bad = table.filter(pc.invert(failed)).drop_columns([ERROR]), table.filter(failed)
            if len(good):
                io.write_table(good, str(self.out / "data" / name), self.fmt)
            if len(bad):
                io.write_table(bad, str(self.out / "errors" / name), self.fmt)
            counts["rows_out"] += len(good)
            counts["rows_failed"] += len(bad)
            ids = table.select(ID_COLUMNS).group_by(ID_COLUMNS).aggregate([])
            counts["rows_in"] += len(ids)
        return counts

    def on_write_complete(self, write_result: Any) -> None:
        for returned in write_result.write_returns:
            for key, value in returned.items():
                self.counts[key] += value


def plan_blocks(scans: list[io.Scan], rows_per_block: int) -> list[dict[str, Any]]:
    """Row ranges of the input files, one Ray Data block each: every stage actor gets work, output is written
    (and a resume picks up) block by block, and a block reads only its own rows, where it runs."""
    return [block for scanned in scans for block in scanned.blocks(rows_per_block)]


def _reader(text_column: str, done: dict[str, list[int]]) -> Callable[[pa.Table], pa.Table]:
    def read(batch: pa.Table) -> pa.Table:
        tables = []
        for block in batch["block"].to_pylist():  # a pyarrow batch (batch_format="pyarrow")
            table = io.read_block(json.loads(block), text_column)
            skip = done.get(table["_source"][0].as_py()) if len(table) else None
            if skip:
                table = table.filter(pc.invert(pc.is_in(table["_row"], pa.array(skip, pa.int64()))))
            tables.append(table)
        return pa.concat_tables(tables, promote_options="permissive")
    return read


def run_job(spec: JobSpec, stage_cls: type, stage_kwargs: dict[str, Any], *, concurrency: int = 1,
            num_cpus: float = 1.0, num_gpus: float = 0.0, batch_size: int = 256, rows_per_block: int | None = None,
            read_num_cpus: float = 1.0, env: dict[str, str] | None = None, calls_per_actor: int = 1,
            ray_remote_args: dict[str, Any] | None = None) -> Summary:
    """Run (or resume) a job on the connected Ray cluster; returns this run's counts.

    Each stage actor reserves `num_cpus` and `num_gpus`; blocks hold `rows_per_block` rows (default: the
    rows split four ways per actor, at least `batch_size`, at most 16 times it), and a stage is handed one
    block at a time, or `calls_per_actor` at once, each on its own thread (for a stage that waits on others,
    and is thread-safe). `ray_remote_args` go to every
    read, stage and write (e.g. `resources` that keep them where the files are)."""
    files = io.list_inputs(spec.input)
    out = claim_output(spec)
    done = done_rows(out)
    skipped = sum(len(r) for r in done.values())
    start = time.perf_counter()
    scans = [io.scan(f) for f in files]  # each file read once to plan, by line offsets or its footer
    if rows_per_block is None:
        total = sum(s.rows for s in scans)
        rows_per_block = min(max(batch_size, -(-total // (4 * concurrency))), 16 * batch_size)
    blocks = plan_blocks(scans, rows_per_block) or [{"path": files[0], "lo": 0, "hi": 0, "start": 0, "end": 0,
                                                     "groups": [], "first": 0}]
    # Each block travels as JSON text: Ray Data's items are columns, and a block's fields differ by format.
    ds = ray.data.from_items([{"block": json.dumps(b)} for b in blocks], override_num_blocks=len(blocks))
    everywhere = dict(ray_remote_args or {})
    # The reads stay their own tasks (max_retries differs from the stage's arguments, so Ray Data does not
    # fuse them into the stage): fused, it bundled `batch_size` ranges, i.e. the whole input, into one task
    # whose output was written once, at the end, and a killed job had saved nothing.
    # At most IO_TASKS reads and writes at once: with a fraction of a CPU (or none) each, Ray Data would
    # start one worker process per block (24 at once were seen, each taking CPU from the engines to start).
    ds = ds.map_batches(_reader(spec.text_column, done), batch_size=1, batch_format="pyarrow",
                        num_cpus=read_num_cpus, max_retries=3, concurrency=IO_TASKS, **everywhere)
    stage_args = {**everywhere, "runtime_env": {"env_vars": env}} if env else everywhere
    # A block is the stage's batch (batch_size=None): blocks never meet before the stage, so each keeps the
    # column types its own rows give (a file read whole once gave one schema; blocks read apart may differ).
    pool = ray.data.ActorPoolStrategy(size=concurrency) if calls_per_actor == 1 else ray.data.ActorPoolStrategy(
        size=concurrency, max_tasks_in_flight_per_actor=calls_per_actor, max_concurrent_calls_per_actor=calls_per_actor,
        enable_true_multi_threading=True)
    ds = ds.map_batches(stage_cls, fn_constructor_kwargs=stage_kwargs, batch_size=None,
                        batch_format="pyarrow", compute=pool, num_cpus=num_cpus, num_gpus=num_gpus, **stage_args)
    sink = SplitSink(out, spec.output_format)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": read_num_cpus, **everywhere}, concurrency=IO_TASKS)
    c = sink.counts
    if c["rows_in"] == 0 and skipped == 0:
        raise JobError(f"input {spec.input!r} holds no rows")
    return Summary(c["rows_in"], c["rows_out"], c["rows_failed"], skipped, time.perf_counter() - start)
