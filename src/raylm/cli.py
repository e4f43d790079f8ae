"""The `raylm` command. Each command maps its flags onto the one config tree."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Optional

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
    from raylm.serve.control.service import run_forever

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # Serve's driver-side INFO lines ("Started Serve", "Application is ready") are in the logs
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # Ray's warning that token auth is on, at every start: raylm's own cluster always has it (docs/serve.md).
        from raylm._ray import TOKEN_AUTH_LOGGER

        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
    from raylm.serve.edge.access import load_access

    try:
        cfg = load_config(config, model=model, replicas=replicas, host=host, port=port, address=address)
        keyed = load_access(cfg.serve).keyed  # a keys file that is missing or empty fails here, not later
        if cfg.serve.usage.enabled and cfg.serve.usage.required:  # a usage database that cannot be opened too
            from raylm.serve.usage.store import UsageStore

            UsageStore(cfg.serve.usage_database).close()
    except (ValidationError, ValueError, OSError) as exc:
        console.print(f"[red]invalid config:[/red] {exc}")
        raise typer.Exit(2) from None
    if not keyed and not cfg.serve.loopback:
        console.print(f"[yellow]warning: {cfg.serve.host}:{cfg.serve.port} serves without API keys "
                      "(serve.allow_anonymous): anyone who reaches it can use every model, as any tenant[/yellow]")

    def on_ready(service) -> None:
        from rich.table import Table

        from raylm.serve.usage.ledger import access_log_path

        for name, notes in service.choices.items():
            console.print(f"[dim]{name}: " + "; ".join(notes) + "[/dim]", highlight=False)
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_row("API", f"[bold]{service.url}/v1[/bold]")
        table.add_row("playground", f"{service.url}/")
        table.add_row("models", ", ".join(f"{m.name} ({m.task})" for m in cfg.models))
        table.add_row("status", f"{service.url}/status  (raylm status)")
        table.add_row("metrics", service.metrics_url)
        table.add_row("logs", service.log_dir + ("" if verbose else "  (-v: here too)"))
        usage = cfg.serve.usage
        if usage.enabled:
            table.add_row("usage", f"{_redacted(cfg.serve.usage_database)}  (raylm usage)")
            if cfg.serve.access_log.enabled:
                table.add_row("access log", str(access_log_path()))
        if cfg.serve.otlp_endpoint:
            table.add_row("traces", f"{cfg.serve.otlp_endpoint}/v1/traces")
        console.print(table, highlight=False)
        if usage.enabled and cfg.serve.access_log.enabled and cfg.serve.access_log.stdout:
            from raylm.serve.usage.report import follow

            follow(access_log_path(), lambda line: print(line, flush=True))
        console.print(f"[green]raylm is ready[/green]  (Ctrl-C stops; kill -HUP {os.getpid()} applies an edited "
                      "config)", highlight=False)
        print(f"{service.url}/v1", flush=True)

    from raylm.serve.control.service import DeployError

    def on_reload(service) -> None:
        """SIGHUP: the config file read again (with this command's options) and applied in place."""
        console.print("config: reading it again and applying it (replicas replaced one by one)")
        try:
            new = load_config(config, model=model, replicas=replicas, host=host, port=port, address=address)
            load_access(new.serve)
            took = service.apply(new, report=lambda line: console.print(f"[yellow]{line}[/yellow]"))
        except Exception as exc:  # whatever went wrong, the service keeps running as it was
            console.print(f"[red]config not applied:[/red] {exc}", highlight=False)
            return
        console.print(f"[green]config applied[/green] in {took:.1f}s", highlight=False)

    try:
        run_forever(cfg, on_ready, verbose, report=lambda line: console.print(f"[yellow]{line}[/yellow]"),
                    progress=lambda line: console.print(line, highlight=False), on_reload=on_reload)
    except DeployError as exc:
        console.print(f"[red]raylm could not start:[/red] {exc}")
        raise typer.Exit(1) from None


@app.command("status")
def status_command(
    url: Annotated[str, typer.Option(help="The raylm server.")] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="The raw /status body.")] = False,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
) -> None:
    """Each model's replicas, running and queued requests, tok/s, TTFT and tenants over the last minute."""
    import json
    import sys


    from raylm.serve.status import render

    with _api_client(api_key_env) as client:
        body = _get_json(client, f"{url.rstrip('/').removesuffix('/v1')}/status", {})
    if as_json:
        print(json.dumps(body, indent=2))
        return
    out = Console(width=None if sys.stdout.isatty() else 160)  # piped: whole rows, not an 80-column wrap
    for part in render(body):
        out.print(part)


def _api_client(api_key_env: str) -> Any:
    """An HTTP client for raylm's API, with the key from `api_key_env` when it is set."""
    import os

    import httpx

    key = os.environ.get(api_key_env)
    return httpx.Client(timeout=60, headers={"authorization": f"Bearer {key}"} if key else {})


def _get_json(client: Any, url: str, params: dict) -> Any:
    """GET a JSON body; exit 2 when the server cannot be reached, 1 when it answers an error."""
    import httpx

    try:
        r = client.get(url, params=params)
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach {url}:[/red] {exc}")
        raise typer.Exit(2) from None
    if r.status_code != 200:
        console.print(f"[red]{r.status_code}:[/red] {r.text}")
        raise typer.Exit(1)
    return r.json()


def _redacted(url: str) -> str:
    from raylm.serve.usage.store import redact

    return redact(url)


@app.command("usage")
def usage_command(
    url: Annotated[str, typer.Option(help="The raylm server.")] = "http://127.0.0.1:8000",
    days: Annotated[int, typer.Option(min=1, max=366, help="How many days back (ending now).")] = 7,
    bucket: Annotated[str, typer.Option(help="Bucket width: 1m, 1h or 1d.")] = "1d",
    group_by: Annotated[str, typer.Option(help="Comma-separated: project_id (the tenant), api_key_id, model, batch.")]
    = "project_id,model",
    kind: Annotated[str, typer.Option(help="completions or embeddings.")] = "completions",
    as_json: Annotated[bool, typer.Option("--json", help="The raw pages.")] = False,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
) -> None:
    """Tokens and requests per tenant, key and model from the usage API (an admin key sees every tenant)."""
    import json
    import sys
    import time


    from raylm.serve.usage.report import usage_table

    params: dict[str, object] = {"start_time": int(time.time()) - days * 86400, "bucket_width": bucket,
                                 "group_by": [g for g in group_by.split(",") if g]}
    base = f"{url.rstrip('/').removesuffix('/v1')}/v1/organization/usage/{kind}"
    pages = []
    with _api_client(api_key_env) as client:
        for _ in range(1000):  # bounded: 1000 pages are far more than 366 days in any bucket
            pages.append(_get_json(client, base, params))
            if not pages[-1].get("has_more"):
                break
            params["page"] = pages[-1]["next_page"]
    if as_json:
        print(json.dumps(pages, indent=2))
        return
    Console(width=None if sys.stdout.isatty() else 160).print(usage_table(pages, kind))


@app.command("build")
def build_command(
    config: Annotated[Optional[Path], typer.Argument(help="raylm YAML config; defaults to the bundled models.",
                                                     exists=True, dir_okay=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Write a Ray Serve config file for `serve deploy` on any Ray cluster (KubeRay: serveConfigV2)."""
    import yaml
    from pydantic import ValidationError

    from raylm.config import load_config
    from raylm.serve.control.builder import serve_config_file

    try:
        cfg = load_config(config)
        text = yaml.safe_dump(serve_config_file(cfg), sort_keys=False)
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]cannot build:[/red] {exc}")
        raise typer.Exit(2) from None
    header = ("# Ray Serve config written by `raylm build`: serve deploy FILE (or KubeRay's serveConfigV2).\n"
              "# Start the cluster with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=0 "
              "(raylm serve does),\n# and install raylm on every node (the image in deploy/kuberay does).\n")
    if out is None:
        print(header + text, end="")
    else:
        out.write_text(header + text)
        console.print(f"wrote {out}")
    if cfg.serve.host in ("127.0.0.1", "localhost", "::1"):
        console.print(f"note: the API binds {cfg.serve.host}:{cfg.serve.port} on the head node, reachable from "
                      "there only; for a cluster Service set serve.host: 0.0.0.0 (with API keys)")


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
