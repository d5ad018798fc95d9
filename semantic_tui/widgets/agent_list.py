"""The agent list: name, tier, tokens, size, last used. Agents created over HTTP appear live."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from semantic_core.engine.snapshot import AgentInfo
from semantic_tui.formatting import ago, human_bytes, tier_label


class AgentList(DataTable):
    HELP = """\
## Agents

Every agent is a conversation with its own KV cache.

- **hot**: its cache is in memory (counted by the block pool)
- **pinned**: hot, and never evicted
- **cold**: saved on disk; it is loaded back when you chat with it
- **busy**: generating now

`Enter` opens the selected agent. `n` new, `r` rename, `s` save, `e` evict,
`p` pin/unpin, `f` fork, `Delete` delete, `x` export to Markdown.
"""

    class Selected(Message):
        def __init__(self, agent_id: str) -> None:
            super().__init__()
            self.agent_id = agent_id

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._rows: tuple = ()

    COLUMNS = ("agent", "tier", "tokens", "size", "used")
    MAX_NAME_WIDTH = 20

    def on_mount(self) -> None:
        for label in self.COLUMNS:
            self.add_column(label, key=label, width=len(label))

    @property
    def selected_id(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None

    def update_agents(self, agents: tuple[AgentInfo, ...], current: str | None) -> None:
        rows = tuple(sorted(agents, key=lambda a: -a.last_used))
        fingerprint = (
            current,
            *(
                (
                    a.id,
                    a.name,
                    a.tier,
                    a.pinned,
                    a.running,
                    a.compatible,
                    a.tokens,
                    a.disk_bytes,
                    int(a.last_used) // 60,
                )
                for a in rows
            ),
        )
        if fingerprint == self._rows:
            return
        self._rows = fingerprint
        keep = self.selected_id or current
        cells = []
        for a in rows:
            size = human_bytes(a.kv_bytes if a.tier == "hot" else a.disk_bytes)
            name = f"[b]{a.name}[/]" if a.id == current else a.name
            cells.append(
                (
                    a.id,
                    [
                        name,
                        tier_label(a.tier, a.pinned, a.running, a.compatible),
                        str(a.tokens),
                        size,
                        ago(a.last_used),
                    ],
                )
            )
        # Explicit widths (the widest cell, as automatic widths would be): DataTable measures automatic
        # widths lazily, and a screen drawn before that showed every cell cut to its header's width.
        for index, (label, column) in enumerate(zip(self.COLUMNS, self.columns.values(), strict=True)):
            widest = max((Text.from_markup(row[index]).cell_len for _, row in cells), default=0)
            if label == "agent":
                widest = min(widest, self.MAX_NAME_WIDTH)
            column.width = max(len(label), widest)
        self.clear()
        for key, row in cells:
            self.add_row(*row, key=key)
        if keep is not None:
            for index, a in enumerate(rows):
                if a.id == keep:
                    self.move_cursor(row=index, animate=False)
                    break

    def select(self, agent_id: str) -> None:
        """Put the cursor on `agent_id` (when the app opens an agent by other means)."""
        for index in range(self.row_count):
            if self.coordinate_to_cell_key((index, 0)).row_key.value == agent_id:
                self.move_cursor(row=index, animate=False)
                return

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.Selected(event.row_key.value))
