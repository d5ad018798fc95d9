"""The log panel (embedded server and engine logs) and the model and server information."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown, RichLog


class LogScreen(Screen):
    TITLE = "Logs"
    BINDINGS = [Binding("escape,l", "app.pop_screen", "Back")]

    def __init__(self, lines) -> None:
        super().__init__()
        self.lines = lines
        self.shown = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="log", wrap=True, markup=False, highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self.pump()
        self.set_interval(0.3, self.pump)

    def pump(self) -> None:
        log = self.query_one(RichLog)
        lines = list(self.lines)
        total = getattr(self.lines, "total", len(lines))
        new = total - self.shown
        if new > 0:
            for line in lines[-min(new, len(lines)) :]:
                log.write(line)
            self.shown = total


class InfoScreen(Screen):
    TITLE = "Model and server"
    BINDINGS = [Binding("escape,m", "app.pop_screen", "Back")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Header()
        yield Markdown(self.text)
        yield Footer()
