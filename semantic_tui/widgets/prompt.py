"""The input box: multi-line, Enter sends, Ctrl+J inserts a new line, Up/Down walk the history."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    HELP = """\
## Message

Type a message and press `Enter` to send it to the selected agent (a new agent is created if none is
selected). `Ctrl+J` starts a new line. `Up` on the first line recalls earlier messages, `Down` on the
last line goes forward again.
"""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.sent: list[str] = []
        self._cursor: int | None = None

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            text = self.text.strip()
            if text:
                self.sent.append(text)
                self._cursor = None
                self.clear()
                self.post_message(self.Submitted(text))
            return
        if event.key == "ctrl+j":
            event.prevent_default()
            event.stop()
            self.insert("\n")
            return
        if event.key == "up" and self.cursor_location[0] == 0 and self.sent:
            event.prevent_default()
            event.stop()
            self._cursor = len(self.sent) - 1 if self._cursor is None else max(0, self._cursor - 1)
            self.load_text(self.sent[self._cursor])
            return
        if event.key == "down" and self._cursor is not None and self.cursor_location[0] == self.document.line_count - 1:
            event.prevent_default()
            event.stop()
            self._cursor += 1
            if self._cursor >= len(self.sent):
                self._cursor = None
                self.load_text("")
            else:
                self.load_text(self.sent[self._cursor])
            return
        await super()._on_key(event)
