"""Small formatting helpers shared by the widgets."""

from __future__ import annotations

import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def ago(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now or time.time()) - timestamp)
    if seconds < 60:
        return "now"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def tier_label(tier: str, pinned: bool, running: bool, compatible: bool = True) -> str:
    if tier == "damaged":
        return "[red]damaged[/]"
    if not compatible:
        return "[magenta]other model[/]"
    if running:
        return "[bold yellow]busy[/]"
    if tier == "hot":
        return "[green]pinned[/]" if pinned else "[green]hot[/]"
    return "[dim]cold[/]"
