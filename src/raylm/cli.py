"""The `raylm` command. Each command maps its flags onto the one config tree."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(help="LLM inference on Ray: serve, data pipelines, benchmarks.", no_args_is_help=True,
                  add_completion=False)
console = Console(stderr=True)


def _add_data_commands() -> None:
    from raylm.data.cli import app as data_app

    app.add_typer(data_app, name="data")


@app.callback()
def main() -> None:
    """raylm: one tool from a laptop to a GPU cluster."""


@app.command("serve")
def serve_command(
    config: Annotated[Optional[Path], typer.Argument(help="raylm YAML config; defaults to the bundled models.",
                                                     exists=True, dir_okay=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Replace the first model: bundled:<name>, a folder or an HF id.")] = None,
    replicas: Annotated[Optional[int], typer.Option(min=1, help="Replicas for every model.")] = None,
    host: Annotated[Optional[str], typer.Option(help="HTTP bind address (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default 8000).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Join a Ray cluster ('auto' or host:port) instead of starting one.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's and vLLM's output here too (it is always in the log files).")] = False,
) -> None:
    """Serve models behind an OpenAI-compatible API until Ctrl-C."""
    from pydantic import ValidationError

    from raylm.config import load_config
    from raylm.serve.runner import run_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, model=model, replicas=replicas, host=host, port=port, address=address)
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]invalid config:[/red] {exc}")
        raise typer.Exit(2) from None

    def on_ready(service) -> None:
        names = ", ".join(m.name for m in cfg.models)
        for name, notes in service.choices.items():
            console.print(f"{name}: " + "; ".join(notes))
        console.print(f"[green]raylm is serving[/green] {names} at [bold]{service.url}/v1[/bold]  (Ctrl-C stops)")
        console.print(f"logs: {service.log_dir}")
        print(f"{service.url}/v1", flush=True)

    from raylm.serve.runner import DeployError

    try:
        run_forever(cfg, on_ready, verbose, report=lambda line: console.print(f"[yellow]{line}[/yellow]"))
    except DeployError as exc:
        console.print(f"[red]raylm could not start:[/red] {exc}")
        raise typer.Exit(1) from None


@app.command("prepare")
def prepare_command(
    config: Annotated[Optional[Path], typer.Argument(help="raylm YAML config; defaults to the bundled models.",
                                                     exists=True, dir_okay=False)] = None,
) -> None:
    """Resolve every model's weights now (converting bundled ones once), so `serve` starts faster."""
    from raylm.config import load_config
    from raylm.models import resolve_source

    cfg = load_config(config)
    for model in cfg.models:
        console.print(f"{model.name}: {resolve_source(model.source, cfg.serve.cache_dir)}")


def _numbers(text: str, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@app.command("bench")
def bench_command(
    url: Annotated[str, typer.Option(help="OpenAI base URL of any compatible server.")] = "http://127.0.0.1:8000/v1",
    model: Annotated[str, typer.Option(help="Model name as the server lists it.")] = "smollm2-135m-instruct",
    concurrency: Annotated[str, typer.Option(help="Closed-loop points: requests in flight, comma-separated ('' for none).")] = "1,2,4,8,16,32",
    rate: Annotated[str, typer.Option(help="Open-loop points: Poisson arrivals per second, comma-separated.")] = "",
    requests: Annotated[int, typer.Option(min=1, help="Requests per load point.")] = 64,
    duration: Annotated[float, typer.Option(min=1, help="Seconds per load point, at most.")] = 120.0,
    input_tokens: Annotated[int, typer.Option(min=1, help="Synthetic prompt length, in the model's tokens.")] = 100,
    output_tokens: Annotated[int, typer.Option(min=1, help="max_tokens, with ignore_eos: a fixed output length.")] = 64,
    prompts: Annotated[Optional[Path], typer.Option(help="JSONL of prompts ({\"prompt\": ...} per line) instead of synthetic ones.",
                                                    exists=True, dir_okay=False)] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder for synthetic prompts (default: the bundled model's, or MODEL).")] = None,
    endpoint: Annotated[str, typer.Option(help="completions or chat.")] = "completions",
    warmup: Annotated[int, typer.Option(min=0, help="Requests sent first and not measured.")] = 4,
    slo: Annotated[Optional[str], typer.Option(help="Goodput bounds in seconds, e.g. ttft=0.5,itl=0.05,e2e=5.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key (never pass keys as flags).")] = "OPENAI_API_KEY",
    out: Annotated[Optional[Path], typer.Option(help="Folder for results.json, report.md and PNG plots.")] = None,
) -> None:
    """Drive an OpenAI-compatible server with streaming requests; report TTFT, ITL, E2E, tok/s and goodput."""
    import asyncio
    import os
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raylm.bench import prompts as prompt_source
    from raylm.bench.report import markdown, parse_slo, point_label, write
    from raylm.bench.run import BenchSpec, check_server, run_bench

    if endpoint not in ("completions", "chat"):
        raise typer.BadParameter("--endpoint is completions or chat")
    try:
        spec = BenchSpec(url=url, model=model, prompts=[], output_tokens=output_tokens, endpoint=endpoint,
                         concurrency=_numbers(concurrency, int), rates=_numbers(rate), requests=requests,
                         duration_s=duration, warmup=warmup, slo=parse_slo(slo),
                         api_key=os.environ.get(api_key_env) or None)
        if not spec.points:
            raise ValueError("no load points: give --concurrency and/or --rate")
        check_server(spec)
        n = warmup + requests * len(spec.points)
        spec.prompts = (prompt_source.from_jsonl(prompts) if prompts else
                        prompt_source.synthetic(prompt_source.load_tokenizer(tokenizer, model), n, input_tokens))
    except ValueError as exc:
        console.print(f"[red]raylm bench:[/red] {exc}")
        raise typer.Exit(2) from None

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[failed]} failed"), console=console) as progress:
        tasks = {label: progress.add_task(label, total=total, failed=0) for label, total in
                 [("warmup", warmup)] * bool(warmup) + [(point_label(k, v), requests)
                                                         for k, v in spec.points]}

        def on_request(label, result) -> None:
            progress.advance(tasks[label])
            if not result.ok:
                progress.update(tasks[label], failed=progress.tasks[tasks[label]].fields["failed"] + 1)

        measured = asyncio.run(run_bench(spec, on_request))
    points = [p for p, _ in measured]
    out = out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    meta = {"url": url, "model": model, "endpoint": endpoint, "input": str(prompts) if prompts else f"{input_tokens} tokens (synthetic)",
            "output_tokens": output_tokens, "requests_per_point": requests, "warmup": warmup,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    files = write(points, [r for _, r in measured], out, meta)
    print(markdown(points, f"raylm bench: {model}"))
    console.print("wrote " + ", ".join(str(f) for f in files))


_add_data_commands()

if __name__ == "__main__":
    app()
