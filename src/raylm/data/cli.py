"""`raylm data tokenize|embed|generate IN OUT`: the flags map onto the config's `data` section."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Ray Data pipelines: tokenize, embed, batch-generate. IN: JSONL, Parquet or text "
                       "(file, directory or glob). OUT: a directory of Parquet (or JSONL) files.",
                  no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)

In = Annotated[str, typer.Argument(help="Input file, directory or glob (local path or URI).")]
Out = Annotated[Path, typer.Argument(help="Output directory (data/, errors/); rerun to resume.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="raylm YAML config.", exists=True)]
TextCol = Annotated[Optional[str], typer.Option(help="Input column with the text (default: text).")]
Fmt = Annotated[Optional[str], typer.Option("--format", help="parquet (default) or jsonl.")]
Conc = Annotated[Optional[int], typer.Option(min=1, help="Stage actors (each loads the model once).")]


def _run(task: str, input: str, output: Path, config: Path | None, stage: str, kwargs: dict[str, Any],
         options: dict[str, Any], **data: Any) -> None:
    import ray

    from raylm import _ray, hardware
    from raylm.config import load_config
    from raylm.data import io, job, llm_stages
    from raylm.models import resolve_source

    app_cfg = load_config(config, data=data)
    cfg = app_cfg.data
    ref = kwargs.pop("source") or getattr(cfg, _SOURCE[stage])
    with _job_errors():
        model = app_cfg.data_model(ref, _TASK[stage])
    path = resolve_source(model.source, app_cfg.serve.cache_dir)
    resources = {"num_cpus": model.num_cpus or 1.0, "num_gpus": model.num_gpus}
    if stage == "Tokenize":
        resources = {"num_cpus": 1.0, "num_gpus": 0.0}
    else:
        kwargs["engine_args"] = model.engine_args
    if stage == "Generate" and model.adapters:  # rows may name an adapter (column `adapter`); --model: the default
        from raylm.adapters import adapter_folders

        kwargs["adapters"] = adapter_folders(model.adapters, model.lora_limits.max_lora_rank)
        kwargs["adapter"] = ref if ref in model.adapters else None
    spec = job.JobSpec(task, input, str(output), cfg.text_column, cfg.output_format,
                       {**options, "model": path})
    with _job_errors():  # fail fast, before starting Ray, on a bad input or an OUT that is not ours
        if all(io.file_size(f) == 0 for f in io.list_inputs(spec.input)):
            raise job.JobError(f"input {spec.input!r} holds no rows")
        job.claim_output(spec)
    console.print(f"{stage.lower()}: {model.source} ({resources['num_cpus']:g} CPU, {resources['num_gpus']:g} GPU "
                  f"per actor, {cfg.concurrency} actor(s))")
    # The job's own cluster: its workers at nice 0, not Ray's 15 (the engine's OpenMP threads stalled
    # behind every nice-0 process; llm_stages._unnice covers a cluster started by others).
    os.environ.setdefault("RAY_worker_niceness", "0")
    _ray.init_local(None, None, _ray.LOCAL_RAY_CONFIG)
    try:
        with _job_errors():
            summary = job.run_job(spec, getattr(llm_stages, stage),
                                  {"text_column": cfg.text_column, **kwargs, _MODEL_ARG[stage]: path},
                                  concurrency=cfg.concurrency, batch_size=cfg.batch_size,
                                  read_num_cpus=READ_NUM_CPUS, env=hardware.engine_env(model.env, model.source), **resources)
    finally:
        ray.shutdown()
    console.print(f"[green]done[/green]: rows in {summary.rows_in}, out {summary.rows_out}, "
                  f"failed {summary.rows_failed} (see {output}/errors), already done {summary.rows_skipped}; "
                  f"{summary.rows_per_s:,.1f} rows/s, {summary.wall_s:.1f} s")
    print(f"{summary.rows_in} {summary.rows_out} {summary.rows_failed} {summary.rows_skipped}")


@contextlib.contextmanager
def _job_errors() -> Iterator[None]:
    """A job that cannot run (bad input, foreign OUT): one line on stderr and exit code 2."""
    from raylm.data.job import JobError

    try:
        yield
    except (JobError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


READ_NUM_CPUS = 0.25  # reading is light: a read task holding a whole core slowed the engine actor's start
_MODEL_ARG = {"Tokenize": "tokenizer", "Embed": "model", "Generate": "model"}
_TASK = {"Tokenize": None, "Embed": "embed", "Generate": "generate"}
_SOURCE = {"Tokenize": "tokenizer", "Embed": "embed_model", "Generate": "generate_model"}


@app.command()
def tokenize(input: In, output: Out, config: ConfigOpt = None, text_column: TextCol = None, fmt: Fmt = None,
             concurrency: Conc = None,
             tokenizer: Annotated[Optional[str], typer.Option(help="A model's name in the config, or a source.")] = None,
             chunk_size: Annotated[Optional[int], typer.Option(min=1, help="Split into windows of N tokens.")] = None,
             ) -> None:
    """Tokenize text into token ids with the model's own tokenizer."""
    _run("tokenize", input, output, config, "Tokenize",
         {"source": tokenizer, "chunk_size": chunk_size},
         {"chunk_size": chunk_size}, text_column=text_column, output_format=fmt, concurrency=concurrency)


@app.command()
def embed(input: In, output: Out, config: ConfigOpt = None, text_column: TextCol = None, fmt: Fmt = None,
          concurrency: Conc = None,
          model: Annotated[Optional[str], typer.Option(help="A model's name in the config (its engine args, env "
                                                         "and resources come along), or a source.")] = None) -> None:
    """Sentence embeddings with vLLM's pooling runner (dtype fitted to the CPU; unit-norm float32 vectors)."""
    _run("embed", input, output, config, "Embed",
         {"source": model},
         {}, text_column=text_column, output_format=fmt, concurrency=concurrency)


@app.command()
def generate(input: In, output: Out, config: ConfigOpt = None, text_column: TextCol = None, fmt: Fmt = None,
             concurrency: Conc = None,
             model: Annotated[Optional[str], typer.Option(help="A model's name in the config (its engine args, env "
                                                            "and resources come along), or a source.")] = None,
             max_tokens: Annotated[int, typer.Option(min=1, help="Default max tokens per row.")] = 64,
             temperature: Annotated[float, typer.Option(min=0, help="Default temperature per row.")] = 0.0,
             ) -> None:
    """Batch generation with vLLM (chat template for chat models; per-row max_tokens/temperature)."""
    _run("generate", input, output, config, "Generate",
         {"source": model, "max_tokens": max_tokens, "temperature": temperature},
         {"max_tokens": max_tokens, "temperature": temperature},
         text_column=text_column, output_format=fmt, concurrency=concurrency)
