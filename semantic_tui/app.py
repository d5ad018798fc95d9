"""The workstation: agents, a streaming chat, live pool and cache gauges, and the HTTP API embedded in
the same process on the same engine (one model in memory)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header, Markdown

from semantic_core.agents.record import Sampling
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.types import Failed, Finished, PrefillProgress, TextDelta
from semantic_core.engine.types import Started as EngineStarted
from semantic_core.errors import SemanticError
from semantic_core.observability import configure_logging
from semantic_core.runtime import Runtime
from semantic_core.turns import Turn
from semantic_tui.screens.dialogs import ConfirmScreen, HelpScreen, NewAgentForm, NewAgentScreen, TextPromptScreen
from semantic_tui.screens.info import InfoScreen, LogScreen
from semantic_tui.screens.inspector import PoolInspector
from semantic_tui.widgets.agent_list import AgentList
from semantic_tui.widgets.chat import ChatView
from semantic_tui.widgets.gauges import Gauges
from semantic_tui.widgets.prompt import PromptInput

GENERAL_HELP = """\
# semantic

A workstation for many local agents. Each agent is a conversation with its own KV cache: coming back
to an agent continues from its cache instead of reading the whole conversation again, even after a
restart. Editors and scripts can use the same agents through the Anthropic Messages API served by
this process.

| key | action |
|---|---|
| `Enter` | send the message / open the selected agent |
| `Esc` | stop the answer being generated; else switch between the input and the agent list |
| `F2` / `n` | new agent |
| `r` | rename |
| `s` | save to disk |
| `e` | evict from memory (saved first) |
| `p` | pin / unpin (a pinned agent stays in memory) |
| `f` | fork (the copy shares the cached prefix) |
| `Delete` | delete (asks first) |
| `x` | export the conversation to Markdown |
| `F3` / `i` | pool inspector |
| `F4` / `l` | logs of the embedded server |
| `F5` / `m` | model and server information |
| `F6` / `g` | show or hide the gauges |

Letter keys act on the selected agent when the input box does not have focus (press `Esc`).
| `Ctrl+P` | every command |
| `F1` | help for the focused panel |
| `Ctrl+Q` | quit (hot agents are saved) |
"""


class LogLines(deque):
    """Recent log lines for the log screen; `total` counts every line ever added."""

    def __init__(self, maxlen: int = 2000) -> None:
        super().__init__(maxlen=maxlen)
        self.total = 0

    def add(self, line: str) -> None:
        self.append(line)
        self.total += 1


class LogLinesHandler(logging.Handler):
    """Log records go to a buffer the log screen reads, never to the terminal under the UI."""

    def __init__(self, lines: LogLines) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.add(self.format(record))
        except Exception:  # a log line must never take the UI down
            pass


class SemanticApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "semantic"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("escape", "cancel", "Stop / agents", show=False),
        Binding("f1", "help", "Help"),
        Binding("f2", "new_agent", "New agent"),
        Binding("f3", "inspector", "Pool"),
        Binding("f4", "logs", "Logs"),
        Binding("f5", "info", "Model"),
        Binding("f6", "toggle_gauges", "Gauges", show=False),
        # Letters act when the input box does not have focus (Esc or Tab leaves it).
        Binding("n", "new_agent", "New", show=False),
        Binding("r", "rename", "Rename", show=False),
        Binding("s", "save", "Save", show=False),
        Binding("e", "evict", "Evict", show=False),
        Binding("p", "pin", "Pin", show=False),
        Binding("f", "fork", "Fork", show=False),
        Binding("delete", "delete", "Delete", show=False),
        Binding("x", "export", "Export", show=False),
        Binding("i", "inspector", "Pool", show=False),
        Binding("l", "logs", "Logs", show=False),
        Binding("m", "info", "Model", show=False),
        Binding("g", "toggle_gauges", "Gauges", show=False),
    ]

    def __init__(
        self,
        runtime: Runtime,
        *,
        clock: bool = True,
        export_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.settings = runtime.settings
        self.engine = runtime.engine
        self.turns = runtime.turns
        self.clock = clock
        self.export_dir = export_dir or Path.cwd()
        self.current: str | None = None
        self._opening: object | None = None  # the latest open_agent call: older ones drop their result
        self.handles: dict[str, RequestHandle] = {}
        self.logs = LogLines()
        self._requests_seen = 0.0
        self._requests_at = time.monotonic()
        self._rps = 0.0
        self._quitting = False
        self._gauge_timer: Timer | None = None

    # Layout --------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=self.clock)
        with Horizontal(id="main"):
            yield AgentList(id="agents")
            with Vertical(id="chat-column"):
                yield ChatView(id="chat")
                yield PromptInput(id="prompt")
            yield Gauges(id="gauges")
        yield Footer()

    def on_mount(self) -> None:
        configure_logging(self.settings.server_log_level, handler=LogLinesHandler(self.logs))
        self.sub_title = "loading the model…"
        self.main_screen.query_one(PromptInput).focus()
        self._apply_width(self.size.width)
        self.start_engine()

    def on_resize(self, event: Any) -> None:
        self._apply_width(event.size.width)

    def _apply_width(self, width: int) -> None:
        self.screen.set_class(width < 120, "narrow")

    # Engine and server -------------------------------------------------------------------------------

    @property
    def api_state(self) -> str:
        return self.runtime.api_state

    @work(thread=True, exclusive=True, group="engine")
    def start_engine(self) -> None:
        try:
            self.runtime.start_engine()
        except Exception as exc:
            self.call_from_thread(
                self.notify, f"The model could not be loaded: {exc}", title="Model", severity="error", timeout=30
            )
            self.call_from_thread(setattr, self, "sub_title", "no model")
            return
        self.call_from_thread(self.engine_ready)

    async def engine_ready(self) -> None:
        info = self.engine.info
        assert info is not None
        self.sub_title = f"{info.model_id} · {info.device} · {info.weights}"
        self._gauge_timer = self.set_interval(0.25, self.refresh_gauges)
        self.refresh_gauges()
        if self.runtime.serve_api:
            await self.start_server()
        snap = self.engine.snapshot()
        if snap.agents and self.current is None:
            latest = max(snap.agents, key=lambda a: a.last_used)
            await self.open_agent(latest.id)
        else:
            await self.main_screen.query_one(ChatView).show_history([], self._empty_note())

    async def start_server(self) -> None:
        state = await self.runtime.start_api()
        if state.startswith("off: port"):
            host, port = self.settings.server_host, self.settings.server_port
            self.notify(
                f"Port {port} on {host} is in use, so the API is off. The workstation works as usual; "
                "start it with --port to serve the API too.",
                title="API",
                severity="warning",
                timeout=12,
            )

    @property
    def main_screen(self) -> Screen:
        """The screen holding the agent list, chat and gauges, whatever modal is on top of it."""
        if not self.screen_stack:
            raise NoMatches("the app has no screens")
        return self.screen_stack[0]

    def refresh_gauges(self) -> None:
        if self._quitting or not self.is_running:
            return
        try:
            snap = self.engine.snapshot()
        except SemanticError:
            return
        rps = None
        if self.runtime.server is not None:  # requests of this app's own server, counted in its engine's metrics
            now = time.monotonic()
            total = self.engine.metrics.requests_served()
            if now - self._requests_at >= 1.0:
                self._rps = (total - self._requests_seen) / (now - self._requests_at)
                self._requests_seen, self._requests_at = total, now
            rps = self._rps
        try:
            self.main_screen.query_one(Gauges).show(snap, self.api_state, rps)
            self.main_screen.query_one(AgentList).update_agents(snap.agents, self.current)
        except NoMatches:  # a timer tick that lands while the app tears its widgets down
            return

    # Chat ------------------------------------------------------------------------------------------

    def _empty_note(self) -> str:
        return (
            "No agent selected. Type a message to start a new agent, or press `n` to create one with a "
            "name and a system prompt."
        )

    async def open_agent(self, agent_id: str) -> None:
        self.current = agent_id
        self._opening = opening = object()
        try:
            info, history = await asyncio.to_thread(self.engine.get_agent, agent_id)
        except SemanticError as exc:
            self.notify(exc.message, title="Agent", severity="error")
            return
        if self._opening is not opening:
            # Another agent was opened while this one was read (a click during start-up's own
            # opening of the last agent): showing this one now would put it under the other's name.
            return
        where = (
            "in memory"
            if info.tier == "hot"
            else "on disk; it is loaded when you send a message"
            if info.tier == "cold"
            else info.tier
        )
        note = f"[b]{escape(info.name)}[/b] has no messages yet ({where})." if not history else ""
        self.title = f"semantic · {info.name}"
        await self.main_screen.query_one(ChatView).show_history(history, note)
        self.refresh_gauges()
        self.main_screen.query_one(AgentList).select(agent_id)

    async def on_agent_list_selected(self, event: AgentList.Selected) -> None:
        await self.open_agent(event.agent_id)
        self.main_screen.query_one(PromptInput).focus()

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if not self.engine.ready:
            self.notify("The model is still loading.", severity="warning")
            return
        if self.current is not None and self.current in self.handles:
            self.notify("This agent is still answering: wait, or press Esc to stop it.", severity="warning")
            return
        self.send(event.text)

    @work(group="chat")
    async def send(self, text: str) -> None:
        chat = self.main_screen.query_one(ChatView)
        if self.current is None:
            try:
                info = await asyncio.to_thread(self.engine.create_agent)
            except SemanticError as exc:
                self.notify(exc.message, severity="error")
                return
            self.current = info.id
            self.title = f"semantic · {info.name}"
        agent_id = self.current
        try:
            info, history = await asyncio.to_thread(self.engine.get_agent, agent_id)
        except SemanticError as exc:
            self.notify(exc.message, severity="error")
            return
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        messages.append({"role": "user", "content": text})
        await chat.add("user", text)
        answer = await chat.add("assistant")
        try:
            # Sampling and length come from the one defaults policy (the agent's own, the model's,
            # the settings'): see semantic_core/turns.py.
            turn = Turn(messages=messages, agent_id=agent_id)
            started = await self.turns.start(turn)
            handle = started.handle
        except SemanticError as exc:
            await answer.remove()
            self.notify(exc.message, title="Not sent", severity="error", timeout=10)
            return
        self.handles[agent_id] = handle

        stream = Markdown.get_stream(answer.markdown)
        miss: str | None = None
        try:
            async for event in handle:
                if isinstance(event, EngineStarted) and event.diverged_from is not None:
                    # Why this turn recomputed part of the prompt: where it left the agent's cache.
                    miss = self.turns.divergence(turn, started.prompt, event.cached_tokens, event.diverged_from)
                if self.current != agent_id:
                    continue  # switched away: the answer still completes and is saved with the agent
                if isinstance(event, TextDelta):
                    await stream.write(event.text)
                elif isinstance(event, PrefillProgress) and event.total >= 256:
                    answer.show_prefill(event.done, event.total)
                elif isinstance(event, Finished):
                    answer.finish(event.result, miss)
                    if not event.result.turn_saved:
                        self.notify(
                            f"This answer could not be saved to disk: {event.result.save_error}",
                            title="Not saved",
                            severity="error",
                            timeout=15,
                        )
                elif isinstance(event, Failed):
                    message = event.error.message if isinstance(event.error, SemanticError) else str(event.error)
                    self.notify(message, title="Generation failed", severity="error", timeout=15)
        finally:
            await stream.stop()
            self.handles.pop(agent_id, None)
            self.refresh_gauges()

    def action_cancel(self) -> None:
        handle = self.handles.get(self.current or "")
        if handle is not None:
            handle.cancel()
            self.notify("Stopped; the answer so far is kept.", timeout=3)
        elif isinstance(self.focused, PromptInput):
            self.main_screen.query_one(AgentList).focus()  # leave the input so letter keys act on agents
        else:
            self.main_screen.query_one(PromptInput).focus()

    # Agent actions -----------------------------------------------------------------------------------

    def _target(self) -> str | None:
        focused = self.focused
        agent_list = self.main_screen.query_one(AgentList)
        agent_id = agent_list.selected_id if focused is agent_list else (self.current or agent_list.selected_id)
        if agent_id is None:
            self.notify("Select an agent first.", severity="warning")
        return agent_id

    def action_new_agent(self) -> None:
        def created(form: NewAgentForm | None) -> None:
            if form is not None:
                self.create_agent(form)

        self.push_screen(NewAgentScreen(), created)

    @work(group="ops")
    async def create_agent(self, form: NewAgentForm) -> None:
        sampling = Sampling(temperature=form.temperature, max_tokens=form.max_tokens)
        try:
            info = await asyncio.to_thread(
                self.engine.create_agent,
                form.agent_id,
                display_name=form.display_name,
                system_prompt=form.system_prompt,
                sampling=sampling,
            )
        except SemanticError as exc:
            self.notify(exc.message, title="New agent", severity="error")
            return
        self.notify(f"Created {info.name}.", timeout=3)
        await self.open_agent(info.id)
        self.main_screen.query_one(PromptInput).focus()

    def action_rename(self) -> None:
        agent_id = self._target()
        if agent_id is None:
            return

        def renamed(name: str | None) -> None:
            if name is not None:
                self.run_agent_op("rename", agent_id, name)

        self.push_screen(TextPromptScreen(f"Display name for {agent_id}"), renamed)

    def action_save(self) -> None:
        if (agent_id := self._target()) is not None:
            self.run_agent_op("save", agent_id)

    def action_evict(self) -> None:
        if (agent_id := self._target()) is not None:
            self.run_agent_op("evict", agent_id)

    def action_pin(self) -> None:
        if (agent_id := self._target()) is not None:
            self.run_agent_op("pin", agent_id)

    def action_fork(self) -> None:
        if (agent_id := self._target()) is not None:
            self.run_agent_op("fork", agent_id)

    def action_rehome(self) -> None:
        if (agent_id := self._target()) is not None:
            self.run_agent_op("rehome", agent_id)

    def action_delete(self) -> None:
        agent_id = self._target()
        if agent_id is None:
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_agent_op("delete", agent_id)

        self.push_screen(ConfirmScreen(f"Delete agent [b]{agent_id}[/] and its saved cache?"), confirmed)

    @work(group="ops")
    async def run_agent_op(self, op: str, agent_id: str, arg: Any = None) -> None:
        engine = self.engine
        try:
            if op == "save":
                await asyncio.to_thread(engine.save_agent, agent_id)
                self.notify(f"Saved {agent_id}.", timeout=3)
            elif op == "evict":
                await asyncio.to_thread(engine.evict_agent, agent_id)
                self.notify(f"Evicted {agent_id}: on disk only.", timeout=3)
            elif op == "pin":
                pinned = not next(a.pinned for a in engine.snapshot().agents if a.id == agent_id)
                await asyncio.to_thread(engine.pin_agent, agent_id, pinned)
                self.notify(f"{'Pinned' if pinned else 'Unpinned'} {agent_id}.", timeout=3)
            elif op == "rename":
                await asyncio.to_thread(engine.rename_agent, agent_id, arg)
                if agent_id == self.current:
                    self.title = f"semantic · {arg or agent_id}"
            elif op == "fork":
                info = await asyncio.to_thread(engine.fork_agent, agent_id)
                self.notify(f"Forked {agent_id} into {info.id}.", timeout=4)
                await self.open_agent(info.id)
            elif op == "rehome":
                await asyncio.to_thread(engine.rehome_agent, agent_id)
                self.notify(f"Moved {agent_id} to this model; its next answer recomputes the conversation.", timeout=6)
            elif op == "delete":
                await asyncio.to_thread(engine.delete_agent, agent_id)
                self.notify(f"Deleted {agent_id}.", timeout=3)
                if self.current == agent_id:
                    self.current = None
                    self.title = "semantic"
                    await self.main_screen.query_one(ChatView).show_history([], self._empty_note())
        except (SemanticError, StopIteration) as exc:
            message = exc.message if isinstance(exc, SemanticError) else f"no agent {agent_id!r}"
            self.notify(message, title=op.capitalize(), severity="error", timeout=10)
        self.refresh_gauges()

    @work(group="ops")
    async def action_export(self) -> None:
        agent_id = self._target()
        if agent_id is None:
            return
        try:
            info, history = await asyncio.to_thread(self.engine.get_agent, agent_id)
        except SemanticError as exc:
            self.notify(exc.message, severity="error")
            return
        lines = [f"# {info.name}", ""]
        if info.system_prompt:
            lines += [f"> **system:** {info.system_prompt}", ""]
        for m in history:
            lines += [f"## {m['role']}", "", m["content"], ""]
        path = self.export_dir / f"{agent_id}.md"
        await asyncio.to_thread(path.write_text, "\n".join(lines))
        self.notify(f"Exported to {path}", title="Export", timeout=6)

    # Screens -----------------------------------------------------------------------------------------

    def action_inspector(self) -> None:
        if self.engine.ready:
            self.push_screen(PoolInspector(self.engine))

    def action_logs(self) -> None:
        self.push_screen(LogScreen(self.logs))

    def action_info(self) -> None:
        self.push_screen(InfoScreen(self._info_text()))

    def action_toggle_gauges(self) -> None:
        self.main_screen.query_one(Gauges).toggle_class("hidden")

    def action_help(self) -> None:
        widget = self.focused
        text = None
        while widget is not None and text is None:
            text = getattr(widget, "HELP", None)
            widget = widget.parent  # type: ignore[assignment]
        self.push_screen(HelpScreen((text + "\n\n---\n\n" if text else "") + GENERAL_HELP))

    def _info_text(self) -> str:
        info = self.engine.info
        lines = ["# Model and server", ""]
        if info is not None:
            rows = [
                ("model", info.model_id),
                ("path", str(info.path)),
                ("source", info.source),
                ("parameters", f"{info.parameters:,}"),
                ("weights", info.weights),
                ("device", info.device),
                ("BLAS", info.blas),
                ("kernels", info.kernels),
                ("context", f"{info.context_length} tokens"),
                ("KV cache", f"{info.bytes_per_token:,} bytes per token ({info.kv_description})"),
                ("fingerprint", info.fingerprint),
                ("loaded in", f"{info.load_seconds:.1f} s"),
            ]
            lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
        s = self.settings
        lines += [
            "## Server",
            "",
            f"API: {self.api_state}",
            "",
            f"Agents folder: `{s.agents_dir}`",
            "",
            f"KV budget: {s.mlx_cache_budget_mb:g} MB · batch {s.mlx_max_batch_size} · "
            f"prefill chunk {s.mlx_prefill_step_size} tokens · hot agents at most "
            f"{s.agent_max_agents_in_memory}",
        ]
        return "\n".join(lines)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("New agent", "Create an agent with a name, system prompt and sampling defaults", self.action_new_agent),
            ("Rename agent", "Change the display name of the selected agent", self.action_rename),
            ("Save agent", "Write the selected agent to disk now", self.action_save),
            ("Evict agent", "Save the selected agent and release its memory", self.action_evict),
            ("Pin or unpin agent", "A pinned agent stays in memory", self.action_pin),
            ("Fork agent", "Copy the selected agent; the copy shares its cached prefix", self.action_fork),
            (
                "Rehome agent",
                "Move an agent saved with another model to this one (its next turn recomputes it)",
                self.action_rehome,
            ),
            ("Delete agent", "Delete the selected agent and its saved cache", self.action_delete),
            ("Export conversation", "Write the selected agent's conversation to Markdown", self.action_export),
            ("Stop generating", "Stop the answer being generated", self.action_cancel),
            ("Pool inspector", "Block map of the KV pool and agents' blocks", self.action_inspector),
            ("Logs", "Logs of the embedded API server and the engine", self.action_logs),
            ("Model and server", "Model, device, BLAS, KV geometry, API address", self.action_info),
            ("Toggle gauges", "Show or hide the gauges panel", self.action_toggle_gauges),
            ("Help", "Keys and what each panel shows", self.action_help),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)

    # Quitting --------------------------------------------------------------------------------------

    async def action_quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        if self._gauge_timer is not None:
            self._gauge_timer.stop()
        self.notify("Saving agents…", timeout=30)
        for handle in list(self.handles.values()):
            handle.cancel()
        await self.runtime.stop()
        self.exit()
