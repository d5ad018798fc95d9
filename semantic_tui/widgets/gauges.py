"""The gauges panel: block pool, cache hit ratio, throughput sparklines, hot agents, queue, API."""

from __future__ import annotations

from collections import deque

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Label, ProgressBar, Sparkline, Static

from semantic_core.engine.snapshot import EngineSnapshot
from semantic_tui.formatting import human_bytes


class Gauges(VerticalScroll):
    HELP = """\
## Gauges

- **KV pool**: blocks of the KV cache budget (SEMANTIC_MLX_CACHE_BUDGET_MB) in use by hot agents.
- **Cache hits**: prompt tokens reused from agents' caches vs. computed.
- **Decode / prefill**: tokens per second, last minute.
- **Hot agents**: in memory, vs. SEMANTIC_AGENT_MAX_AGENTS_IN_MEMORY.
- **Queue**: requests waiting / sequences running.
- **API**: the embedded HTTP server and its requests per second.
"""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.decode: deque[float] = deque([0.0] * 60, maxlen=60)
        self.prefill: deque[float] = deque([0.0] * 60, maxlen=60)

    def compose(self) -> ComposeResult:
        yield Label("KV pool", classes="gauge-title")
        yield ProgressBar(total=1, show_eta=False, id="pool-bar")
        yield Static("", id="pool-text")
        yield Label("Cache hits", classes="gauge-title")
        yield ProgressBar(total=1, show_eta=False, id="hit-bar")
        yield Static("", id="hit-text")
        yield Label("Decode tok/s", classes="gauge-title")
        yield Sparkline(list(self.decode), id="decode-spark")
        yield Static("", id="decode-text")
        yield Label("Prefill tok/s", classes="gauge-title")
        yield Sparkline(list(self.prefill), id="prefill-spark")
        yield Static("", id="prefill-text")
        yield Static("", id="agents-text")
        yield Static("", id="queue-text")
        yield Static("", id="disk-text")
        yield Static("", id="api-text")

    def show(self, snap: EngineSnapshot, api: str, requests_per_second: float | None) -> None:
        """`requests_per_second`: of this app's own embedded server; None when it serves no API."""
        if not self.query("#api-text"):
            return  # not composed yet
        pool = self.query_one("#pool-bar", ProgressBar)
        pool.update(total=max(snap.pool_capacity, 1), progress=snap.pool_used)
        used_mb = snap.pool_used * snap.bytes_per_block
        cap_mb = snap.pool_capacity * snap.bytes_per_block
        shared = f", {snap.pool_shared} shared" if snap.pool_shared else ""
        self.query_one("#pool-text", Static).update(
            f"{snap.pool_used}/{snap.pool_capacity} blocks{shared}\n{human_bytes(used_mb)} of {human_bytes(cap_mb)}"
        )
        total = snap.tokens_reused + snap.tokens_computed
        self.query_one("#hit-bar", ProgressBar).update(total=max(total, 1), progress=snap.tokens_reused)
        self.query_one("#hit-text", Static).update(
            f"{snap.cache_hit_ratio:.0%}: {snap.tokens_reused} reused, {snap.tokens_computed} computed"
        )
        self.decode.append(snap.decode_tps)
        self.prefill.append(snap.prefill_tps)
        self.query_one("#decode-spark", Sparkline).data = list(self.decode)
        self.query_one("#prefill-spark", Sparkline).data = list(self.prefill)
        self.query_one("#decode-text", Static).update(f"{snap.decode_tps:.1f} now")
        self.query_one("#prefill-text", Static).update(f"{snap.prefill_tps:.1f} now")
        self.query_one("#agents-text", Static).update(
            f"Hot [b]{snap.hot_agents}[/]/{snap.max_hot} · agents {len(snap.agents)}"
        )
        self.query_one("#queue-text", Static).update(
            f"Queue [b]{snap.waiting}[/] · running {snap.running + snap.prefilling}"
        )
        self.query_one("#disk-text", Static).update(f"Disk {human_bytes(snap.disk_bytes)} · evicted {snap.evictions}")
        rate = "" if requests_per_second is None else f"\n{requests_per_second:.1f} req/s"
        self.query_one("#api-text", Static).update(f"API {api}{rate}")
