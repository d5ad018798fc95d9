"""The conversation: Markdown messages, streamed as tokens arrive, with timings under each answer."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Markdown, ProgressBar, Static

from semantic_core.engine.types import GenerationResult


class ChatMessage(Vertical):
    def __init__(self, role: str, text: str = "", *, note: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.note = note

    def compose(self) -> ComposeResult:
        yield Label(self.role, classes="role")
        yield Markdown(self.text, classes="content")
        if self.role == "assistant":
            yield ProgressBar(total=1, show_eta=False, classes="prefill hidden")
            yield Static(self.note, classes="stats")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def show_prefill(self, done: int, total: int) -> None:
        bar = self.query_one(ProgressBar)
        bar.remove_class("hidden")
        bar.update(total=total, progress=done)
        self.query_one(".stats", Static).update(f"reading the prompt: {done}/{total} tokens")

    def finish(self, result: GenerationResult, cache_miss: str | None = None) -> None:
        self.query_one(ProgressBar).add_class("hidden")
        self.query_one(".stats", Static).update(describe(result, cache_miss))


def describe(result: GenerationResult, cache_miss: str | None = None) -> str:
    u = result.usage
    line = stats_line(
        result.time_to_first_token,
        result.decode_tokens_per_second,
        u.output_tokens,
        u.prompt_tokens,
        u.cached_tokens,
        result.stop_reason,
        result.stop_sequence,
    )
    if cache_miss:  # "message=2; block=7; token=507; cached=543"
        fields = dict(part.split("=", 1) for part in cache_miss.split("; "))
        line += (
            f" · [yellow]cache left at message {fields.get('message')}, token {fields.get('token')} "
            f"of {fields.get('cached')} cached[/]"
        )
    return line


def stats_line(
    ttft: float | None,
    tps: float | None,
    output: int,
    prompt: int,
    cached: int,
    stop_reason: str,
    stop_sequence: str | None = None,
) -> str:
    parts = []
    if ttft is not None:
        parts.append(f"ttft {ttft:.2f} s")
    if tps:
        parts.append(f"{tps:.1f} tok/s")
    parts.append(f"{output} tokens")
    parts.append(f"prompt {prompt} ({cached} cached)")
    if stop_reason != "end_turn":
        reason = stop_reason.replace("_", " ")
        parts.append(f"[yellow]{reason}{': ' + repr(stop_sequence) if stop_sequence else ''}[/]")
    return " · ".join(parts)


def note_for(message: dict) -> str:
    meta = message.get("meta") or {}
    if not meta:
        return "[yellow]cancelled[/]" if message.get("cancelled") else ""
    return stats_line(
        meta.get("ttft"),
        meta.get("decode_tps"),
        meta.get("output_tokens", 0),
        meta.get("prompt_tokens", 0),
        meta.get("cached_tokens", 0),
        meta.get("stop_reason", "end_turn"),
    )


class ChatView(VerticalScroll):
    HELP = """\
## Conversation

The selected agent's conversation. Answers stream in as they are generated; under each one:
time to first token, decode speed, tokens, and how much of the prompt came from the cache.

`Esc` stops the answer being generated (what was generated is kept).
"""

    def on_mount(self) -> None:
        self.anchor()  # follow new text, until the user scrolls up

    async def show_history(self, messages: list[dict], empty_note: str = "") -> None:
        await self.remove_children()
        if not messages:
            await self.mount(Static(empty_note, classes="empty-note"))
            return
        widgets = []
        for m in messages:
            widgets.append(ChatMessage(m.get("role", "user"), m.get("content", ""), note=note_for(m)))
        await self.mount_all(widgets)
        self.scroll_end(animate=False)

    async def add(self, role: str, text: str = "") -> ChatMessage:
        for note in self.query(".empty-note"):
            await note.remove()
        message = ChatMessage(role, text)
        await self.mount(message)
        self.scroll_end(animate=False)
        return message
