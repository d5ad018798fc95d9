"""`semantic cluster` (several instances behind haproxy) and `semantic serve --ranks N` /
`--distributed` (one model over several processes): the command-line side of docs/CLUSTER.md. The
launching itself is in cluster.py; the engine's side in semantic_core."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from semantic_core.config import Settings
from semantic_tui.cli_common import console, err, fail, settings_from_env


def serve_ranks(settings: Settings, ranks: int, distributed: bool, overrides: dict[str, Any]) -> int:
    """`semantic serve --ranks N` (launch N ranks here) or `--distributed` (be one rank); the exit status.
    `overrides`: the command line's own options, passed on to every rank."""
    from semantic_core.api.server import port_in_use
    from semantic_core.runtime import Runtime

    if not distributed:
        from semantic_tui.cluster import launch_ranks

        if settings.cluster_instance:
            err.print("error: a distributed engine cannot be part of a cluster (unset SEMANTIC_CLUSTER_INSTANCE)")
            return 1
        if port_in_use(settings.server_host, settings.server_port):
            err.print(f"error: port {settings.server_port} on {settings.server_host} is already in use")
            return 1
        err.print(
            f"starting {ranks} ranks ({settings.distributed_backend} backend); rank 0 serves "
            f"http://{settings.server_host}:{settings.server_port}",
            highlight=False,
        )
        return launch_ranks(ranks, settings.distributed_backend, [a for kv in overrides.items() for a in map(str, kv)])
    from semantic_core.engine.distributed import finalize, init_group
    from semantic_core.errors import SemanticError

    try:
        group = init_group(settings.distributed_backend)
    except RuntimeError as exc:
        err.print(f"error: {exc}")
        return 1
    code: int | str | None = 0
    try:
        runtime = Runtime(settings, group=group)
        if group.rank() != 0:
            runtime.follow()
        elif port_in_use(settings.server_host, settings.server_port):
            err.print(f"port {settings.server_port} on {settings.server_host} is already in use")
            code = 1
        else:
            runtime.engine.start()  # every rank loads its share before rank 0 answers anything
            runtime.serve()
    except SemanticError as exc:  # the model cannot be split (or loaded): every rank says so and ends
        err.print(f"error (rank {group.rank()}): {exc.message}", highlight=False)
        code = 1
    except SystemExit as exc:
        code = exc.code
    status = code if isinstance(code, int) else 1
    finalize(settings.distributed_backend, status)  # under MPI: does not return
    return status


cluster_app = typer.Typer(
    help="Several `semantic serve` behind haproxy, each agent on one instance.", no_args_is_help=True
)


@cluster_app.command("up")
def cluster_up(
    instances: Annotated[int, typer.Option("--instances", "-n", min=1, help="How many instances.")] = 3,
    port: Annotated[int, typer.Option(help="haproxy's port: where clients connect.")] = 8080,
    base_port: Annotated[int, typer.Option(help="The first instance's port; the next ones follow.")] = 8101,
    state_dir: Annotated[
        Path | None, typer.Option(help="haproxy's configuration, logs and status (default: <agent cache dir>/cluster).")
    ] = None,
) -> None:
    """Start N instances sharing one agents folder, and haproxy in front of them; restart an instance
    that dies (its agents are served by the others meanwhile). `semantic cluster scale N` (from another
    terminal) adds or removes instances while it runs. Ctrl-C stops everything; each instance saves
    its agents."""
    import signal
    import time

    from semantic_tui.cluster import Cluster

    settings = settings_from_env()
    state = state_dir or settings.agent_cache_dir / "cluster"
    cluster = Cluster(state_dir=state, port=port, base_port=base_port, host=settings.server_host)
    stop = False

    def on_signal(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    desired = state / "desired"
    state.mkdir(parents=True, exist_ok=True)
    desired.write_text(str(instances))
    try:
        for _ in range(instances):
            cluster.add_instance()
        err.print(f"starting {instances} instances (logs in {state}) ...", highlight=False)
        cluster.wait_ready()
        cluster.start_haproxy()
    except (RuntimeError, TimeoutError) as exc:
        cluster.stop()
        raise fail(str(exc)) from None
    err.print(
        f"cluster of {instances} on http://{settings.server_host}:{port} (instances on ports "
        f"{base_port}-{base_port + instances - 1}); Ctrl-C stops it",
        highlight=False,
    )
    try:
        while not stop:
            cluster.write_status()
            for name in cluster.supervise_once():
                err.print(f"instance {name} died and was restarted", highlight=False)
            try:
                want = int(desired.read_text().strip())
            except (OSError, ValueError):
                want = len(cluster.instances)
            if want >= 1 and want != len(cluster.instances):
                err.print(f"scaling to {want} instances", highlight=False)
                cluster.scale(want)
            time.sleep(1.0)
    finally:
        err.print("stopping: every instance saves its agents", highlight=False)
        cluster.stop()


@cluster_app.command("scale")
def cluster_scale(
    instances: Annotated[int, typer.Argument(min=1, help="How many instances the running cluster should have.")],
    state_dir: Annotated[Path | None, typer.Option(help="As given to `semantic cluster up`.")] = None,
) -> None:
    """Ask a running `semantic cluster up` for more or fewer instances (only the agents that hash
    to the new or removed instances move)."""
    state = state_dir or settings_from_env().agent_cache_dir / "cluster"
    if not (state / "status.json").exists():
        raise fail(f"no running cluster found in {state}")
    (state / "desired").write_text(str(instances))
    err.print(f"asked the cluster in {state} for {instances} instances", highlight=False)


@cluster_app.command("status")
def cluster_status(
    url: Annotated[
        list[str] | None, typer.Option("--url", help="An instance's URL (repeatable); default: the running cluster's.")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="As given to `semantic cluster up`.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Each instance's state (read only, over HTTP): health, agents hot and on disk, pool use."""

    from semantic_tui.cluster import instance_status

    urls = list(url or [])
    if not urls:
        state = state_dir or settings_from_env().agent_cache_dir / "cluster"
        try:
            urls = [str(i["url"]) for i in json.loads((state / "status.json").read_text())["instances"]]
        except (OSError, ValueError, KeyError):
            raise fail(f"no running cluster found in {state}; give --url") from None
    key = settings_from_env().anthropic_api_key
    rows = [instance_status(u, key.get_secret_value().split(",")[0] if key else None) for u in urls]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(box=None)
    table.add_column("instance", no_wrap=True)
    table.add_column("url", no_wrap=True, min_width=max(len(str(r["url"])) for r in rows))
    for col in ("state", "agents (hot)", "busy", "pool", "requests"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        state = "unreachable" if "error" in r else "ready" if r.get("ready") else "not ready"
        table.add_row(
            str(r.get("instance") or "?"),
            str(r["url"]),
            state,
            f"{r.get('agents', '-')} ({r.get('hot', '-')})",
            str(r.get("generating", "-")),
            str(r.get("pool", "-")),
            str(r.get("requests", "-")),
        )
    console.print(table)
