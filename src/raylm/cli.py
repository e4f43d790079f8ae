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
        console.print(f"[green]raylm is serving[/green] {names} at [bold]{service.url}/v1[/bold]  (Ctrl-C stops)")
        print(f"{service.url}/v1", flush=True)

    from raylm.serve.runner import DeployError

    try:
        run_forever(cfg, on_ready)
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


_add_data_commands()

if __name__ == "__main__":
    app()
