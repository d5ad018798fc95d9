"""`semantic tui --remote URL ...`: watch running instances (one, or a cluster's) read-only.

For each instance: a line with its state (ready, agents hot and on disk, generating, pool use, requests) and a
table of its agents, refreshed every second over HTTP (`/health/ready`, `/metrics`, `/v1/agents`). Nothing is
changed on the instances: chatting and agent operations belong to the workstation (`semantic tui`) or the API.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Static

from semantic_tui.cluster import instance_status

COLUMNS = ("agent", "tier", "tokens", "generating", "messages", "saved", "last used")


def fetch(url: str, api_key: str | None) -> dict[str, Any]:
    """One instance's state and its agents (first 1,000), or why they could not be read."""
    state: dict[str, Any] = dict(instance_status(url, api_key))
    if "error" in state:
        return state
    headers = {"x-api-key": api_key} if api_key else {}
    try:
        r = httpx.get(f"{url.rstrip('/')}/v1/agents", params={"limit": 1000}, headers=headers, timeout=5)
        state["agent_list"] = r.json().get("data", []) if r.status_code == 200 else []
        if r.status_code != 200:
            state["agents_error"] = f"HTTP {r.status_code}"
    except httpx.HTTPError as exc:
        state["agents_error"] = type(exc).__name__
    return state


def summary(state: dict[str, Any]) -> str:
    name = state.get("instance") or "instance"
    if "error" in state:
        return f"[b]{name}[/b]  {state['url']}  [red]unreachable[/red] ({state['error']})"
    ready = "[green]ready[/green]" if state.get("ready") else "[yellow]not ready[/yellow]"
    return (
        f"[b]{name}[/b]  {state['url']}  {ready}  agents {state.get('agents', '-')} (hot {state.get('hot', '-')})  "
        f"generating {state.get('generating', '-')}  pool {state.get('pool', '-')}  "
        f"requests {state.get('requests', '-')}"
    )


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s}s" if s < 60 else f"{s // 60}m" if s < 3600 else f"{s // 3600}h"


class RemoteApp(App[None]):
    TITLE = "semantic (remote, read-only)"
    BINDINGS = [Binding("q", "quit", "Quit"), Binding("r", "refresh", "Refresh now")]
    CSS = """
    Static.instance { padding: 1 1 0 1; }
    Horizontal.gauge { height: 1; padding: 0 1; }
    Horizontal.gauge Label { width: 12; }
    DataTable { height: auto; max-height: 16; }
    """

    def __init__(self, urls: list[str], api_key: str | None = None, interval: float = 1.0) -> None:
        super().__init__()
        self.urls = [u.rstrip("/") for u in urls]
        self.api_key = api_key
        self.interval = interval
        self.states: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            for i, _url in enumerate(self.urls):
                yield Static("connecting ...", id=f"summary-{i}", classes="instance")
                with Horizontal(classes="gauge"):
                    yield Label("KV pool")
                    yield ProgressBar(total=100, show_eta=False, id=f"pool-{i}")
                table: DataTable[str] = DataTable(id=f"agents-{i}", cursor_type="row")
                table.add_columns(*COLUMNS)
                yield table
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{len(self.urls)} instance{'s' if len(self.urls) != 1 else ''}"
        self.action_refresh()
        self.set_interval(self.interval, self.action_refresh)

    def action_refresh(self) -> None:
        self.run_worker(self._poll, thread=True, exclusive=True, group="poll")

    def _poll(self) -> None:
        states = {url: fetch(url, self.api_key) for url in self.urls}
        self.call_from_thread(self._show, states)

    def _show(self, states: dict[str, dict[str, Any]]) -> None:
        self.states = states
        for i, url in enumerate(self.urls):
            state = states[url]
            self.query_one(f"#summary-{i}", Static).update(summary(state))
            self.query_one(f"#pool-{i}", ProgressBar).update(progress=100 * float(state.get("pool_ratio", 0.0)))
            table = self.query_one(f"#agents-{i}", DataTable)
            table.clear()
            for a in state.get("agent_list", []):
                table.add_row(
                    str(a["id"]),
                    str(a["tier"]),
                    str(a["tokens"]),
                    "yes" if a.get("generating") else "",
                    str(a.get("messages", "")),
                    "yes" if a.get("saved") else "no",
                    _ago(a.get("last_used")),
                    key=str(a["id"]),
                )
