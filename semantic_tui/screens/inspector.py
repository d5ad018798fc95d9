"""The pool inspector: a block map (each block a cell coloured by its agent, shared blocks marked)
and a table of agents with blocks, MB, tier and cache hit ratio; evict or pin from here."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from semantic_core.engine.engine import Engine
from semantic_core.engine.snapshot import EngineSnapshot
from semantic_tui.formatting import tier_label

PALETTE = [
    "#e06c75",
    "#98c379",
    "#e5c07b",
    "#61afef",
    "#c678dd",
    "#56b6c2",
    "#d19a66",
    "#be5046",
    "#7ec699",
    "#f08d49",
    "#b294bb",
    "#81a2be",
]


def colour_for(agent_id: str, order: list[str]) -> str:
    return PALETTE[order.index(agent_id) % len(PALETTE)] if agent_id in order else "#888888"


class BlockMap(Static):
    MAX_ROWS = 12

    def show(self, snap: EngineSnapshot, width: int) -> None:
        order = [a.id for a in snap.agents]
        text = Text()
        per_line = max(8, width - 4)
        used = snap.block_map
        last_used = max(used, default=-1)
        # Large pools: draw the used part (and a row of free blocks), not thousands of free cells.
        shown = min(
            snap.pool_capacity,
            max(per_line, -(-(last_used + 1) // per_line) * per_line + per_line),
            self.MAX_ROWS * per_line,
        )
        for i in range(shown):
            owners = used.get(i)
            if owners:
                char = "▓" if len(owners) > 1 else "█"
                text.append(char, style=colour_for(owners[0], order))
            else:
                text.append("·", style="#444444")
            if (i + 1) % per_line == 0 and i + 1 < shown:
                text.append("\n")
        hidden = snap.pool_capacity - shown
        hidden_used = sum(1 for b in used if b >= shown)
        if hidden:
            text.append(f"\n… {hidden:,} more blocks ({hidden_used:,} in use)", style="dim")
        text.append(
            f"\n█ one agent  ▓ shared prefix  · free   ({snap.block_tokens} tokens per block, "
            f"{snap.bytes_per_block / 1e6:.2f} MB)",
            style="dim",
        )
        self.update(text)


class PoolInspector(Screen):
    TITLE = "Pool inspector"
    BINDINGS = [
        Binding("escape,i", "app.pop_screen", "Back"),
        Binding("e", "evict", "Evict"),
        Binding("p", "pin", "Pin/unpin"),
    ]

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield Static("", id="pool-summary")
            yield BlockMap(id="block-map")
            yield DataTable(id="pool-agents", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for col in ("agent", "tier", "blocks", "shared", "MB", "tokens", "hit ratio"):
            table.add_column(col, key=col)
        self.refresh_view()
        self.set_interval(0.5, self.refresh_view)

    def refresh_view(self) -> None:
        try:
            snap = self.engine.snapshot()
        except Exception:
            return
        self.query_one("#pool-summary", Static).update(
            f"[b]{snap.pool_used}[/] of {snap.pool_capacity} blocks in use ({snap.utilization:.0%}), "
            f"{snap.pool_shared} shared · hot agents {snap.hot_agents}/{snap.max_hot}"
        )
        self.query_one(BlockMap).show(snap, self.size.width)
        table = self.query_one(DataTable)
        selected = None
        if table.row_count:
            selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear()
        order = [a.id for a in snap.agents]
        for a in snap.agents:
            total = a.reused_tokens + a.computed_tokens
            ratio = f"{a.reused_tokens / total:.0%}" if total else "-"
            name = Text("■ ", style=colour_for(a.id, order)) + Text(a.name)
            table.add_row(
                name,
                Text.from_markup(tier_label(a.tier, a.pinned, a.running)),
                str(a.blocks),
                str(a.shared_blocks),
                f"{a.blocks * snap.bytes_per_block / 1e6:.1f}",
                str(a.tokens),
                ratio,
                key=a.id,
            )
        if selected is not None:
            for i, a in enumerate(snap.agents):
                if a.id == selected:
                    table.move_cursor(row=i, animate=False)

    def _selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def action_evict(self) -> None:
        agent_id = self._selected()
        if agent_id:
            self.app.run_agent_op("evict", agent_id)  # type: ignore[attr-defined]

    def action_pin(self) -> None:
        agent_id = self._selected()
        if agent_id:
            self.app.run_agent_op("pin", agent_id)  # type: ignore[attr-defined]
