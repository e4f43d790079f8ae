"""Rewrite serveConfigV2 in deploy/kuberay/raylm.yaml with what `raylm build deploy/kuberay/raylm-config.yaml`
writes now.

    .venv/bin/python deploy/kuberay/regenerate.py          # rewrite it
    .venv/bin/python deploy/kuberay/regenerate.py --check  # exit 1 if it is stale (tests/unit/test_kuberay.py)

Only the literal block under `serveConfigV2: |` changes: every other line of the manifest, comments included,
stays as written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "raylm.yaml"
CONFIG = HERE / "raylm-config.yaml"
_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: \|\n\Z")


def build(config: Path = CONFIG) -> str:
    """The file `raylm build CONFIG -o FILE` writes (the CLI command itself, called in this process)."""
    import typer

    from raylm.cli import build_command

    said = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(said):
        out = Path(tmp) / "serve.yaml"
        try:
            build_command(config, out)
        except typer.Exit:
            raise SystemExit(f"raylm build {config}: {said.getvalue().strip()}") from None
        text = out.read_text()
    # Pass on its notes, not its "wrote FILE": that file was temporary.
    sys.stderr.writelines(line for line in said.getvalue().splitlines(keepends=True) if not line.startswith("wrote "))
    return text


def with_serve_config(manifest: str, serve_config: str) -> str:
    """`manifest` with the block under its one `serveConfigV2: |` line replaced by `serve_config`."""
    lines = manifest.splitlines(keepends=True)
    keys = [i for i, line in enumerate(lines) if _KEY.match(line)]
    if len(keys) != 1:
        raise ValueError(f"expected one `serveConfigV2: |` line, found {len(keys)}")
    start = keys[0] + 1
    indent = len(_KEY.match(lines[keys[0]])["indent"]) + 2
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) >= indent):
        end += 1
    while end > start and not lines[end - 1].strip():  # blank lines after the block separate, not belong
        end -= 1
    block = ["\n" if not line.strip() else " " * indent + line for line in serve_config.splitlines(keepends=True)]
    return "".join(lines[:start] + block + lines[end:])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if raylm.yaml is stale; write nothing.")
    args = parser.parse_args(argv)
    current = MANIFEST.read_text()
    wanted = with_serve_config(current, build())
    if current == wanted:
        print(f"{MANIFEST.name}: serveConfigV2 is up to date")
        return 0
    if args.check:
        print(f"{MANIFEST.name}: serveConfigV2 is stale; run {Path(__file__).name} to rewrite it", file=sys.stderr)
        return 1
    MANIFEST.write_text(wanted)
    print(f"{MANIFEST.name}: serveConfigV2 rewritten from {CONFIG.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
