"""Modal dialogs: new agent, rename, confirm, help."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, TextArea

from semantic_core.agents.record import AGENT_ID_RE


@dataclass
class NewAgentForm:
    agent_id: str | None
    display_name: str | None
    system_prompt: str | None
    temperature: float | None
    max_tokens: int | None


class NewAgentScreen(ModalScreen[NewAgentForm | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("[b]New agent[/]")
            yield Label("Id (letters, digits, - _ .; empty: generated)")
            yield Input(placeholder="e.g. researcher", id="agent-id")
            yield Label("Display name (optional)")
            yield Input(id="display-name")
            yield Label("System prompt (optional)")
            yield TextArea(id="system-prompt")
            with Horizontal(classes="row"):
                with Vertical():
                    yield Label("Temperature")
                    yield Input(placeholder="0.7", id="temperature", type="number")
                with Vertical():
                    yield Label("Max tokens")
                    yield Input(placeholder="512", id="max-tokens", type="integer")
            yield Label("", id="form-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        agent_id = self.query_one("#agent-id", Input).value.strip() or None
        if agent_id is not None and not AGENT_ID_RE.fullmatch(agent_id):
            self.query_one("#form-error", Label).update("Id: 1-64 letters, digits, '-', '_' or '.'")
            return
        temp = self.query_one("#temperature", Input).value.strip()
        max_tokens = self.query_one("#max-tokens", Input).value.strip()
        try:
            temperature = float(temp) if temp else None
            if temperature is not None and not 0 <= temperature <= 2:
                raise ValueError
        except ValueError:
            self.query_one("#form-error", Label).update("Temperature: a number from 0 to 2")
            return
        self.dismiss(
            NewAgentForm(
                agent_id=agent_id,
                display_name=self.query_one("#display-name", Input).value.strip() or None,
                system_prompt=self.query_one("#system-prompt", TextArea).text.strip() or None,
                temperature=temperature,
                max_tokens=int(max_tokens) if max_tokens else None,
            )
        )

    def on_input_submitted(self) -> None:
        self.query_one("#create", Button).press()

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextPromptScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Label(self.title_text)
            yield Input(value=self.value, id="value")
            with Horizontal(classes="buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one(Input).value.strip() if event.button.id == "ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("y", "yes", "Yes")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Label(self.question)
            with Horizontal(classes="buttons"):
                yield Button("Delete", variant="error", id="yes")
                yield Button("Keep", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            yield Markdown(self.text)
            yield Button("Close", id="close")

    def on_button_pressed(self) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
