"""What every `semantic` command shares: the consoles, settings from the environment, and failing with
one line."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from semantic_core.config import ConfigError, Settings, load_settings

console = Console()
err = Console(stderr=True)


def settings_from_env(**overrides: Any) -> Settings:
    """The effective settings, with the command line's overrides (None: not given)."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] invalid configuration: {exc}")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)
