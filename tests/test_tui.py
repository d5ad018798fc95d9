"""The Textual workstation driven by Pilot on the tiny model (and once on the real one)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from textual.css.query import NoMatches

from semantic_tui.app import SemanticApp
from semantic_tui.screens.dialogs import ConfirmScreen, HelpScreen, NewAgentScreen
from semantic_tui.screens.inspector import PoolInspector
from semantic_tui.widgets.agent_list import AgentList
from semantic_tui.widgets.chat import ChatMessage
from semantic_tui.widgets.prompt import PromptInput
from tests.conftest import make_settings

SIZE = (130, 40)


def app_for(tmp_path, loaded, **overrides) -> SemanticApp:
    from semantic_core.runtime import Runtime

    overrides.setdefault("agent_cache_dir", tmp_path / "tui-cache")
    serve_api = overrides.pop("serve_api", False)
    settings = make_settings(tmp_path, **overrides)
    return SemanticApp(Runtime(settings, loaded=loaded, serve_api=serve_api), clock=False, export_dir=tmp_path)


def _holds(condition) -> bool:
    # A widget that is mounted but has not composed its children yet raises
    # NoMatches when queried: that is "not yet", not a failure.
    try:
        return bool(condition())
    except NoMatches:
        return False


async def until(pilot, condition, timeout: float = 30.0, step: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _holds(condition):
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the UI")
        await pilot.pause(step)


async def ready(pilot, app) -> None:
    await until(pilot, lambda: app.engine.ready and app.sub_title.startswith(app.engine.info.model_id))


def tiers(app) -> dict[str, str]:
    return {a.id: a.tier for a in app.engine.snapshot(fresh=True).agents}


def _finished(app, before: int) -> bool:
    messages = list(app.query(ChatMessage))
    if len(messages) < before + 2 or app.current in app.handles:
        return False
    return "tokens" in str(messages[-1].query_one(".stats").render())


async def send(pilot, app, text: str) -> ChatMessage:
    before = len(app.query(ChatMessage))
    app.query_one(PromptInput).focus()
    await pilot.press(*text)
    await pilot.press("enter")
    await until(pilot, lambda: _finished(app, before), timeout=120)
    return list(app.query(ChatMessage))[-1]


async def new_agent(pilot, app, agent_id: str, system: str = "", max_tokens: str = "", temperature: str = "") -> None:
    await pilot.press("f2")
    await until(pilot, lambda: isinstance(app.screen, NewAgentScreen))
    app.screen.query_one("#agent-id").value = agent_id
    if system:
        app.screen.query_one("#system-prompt").load_text(system)
    if max_tokens:
        app.screen.query_one("#max-tokens").value = max_tokens
    if temperature:
        app.screen.query_one("#temperature").value = temperature
    await pilot.click("#create")
    await until(pilot, lambda: app.current == agent_id)
    await until(pilot, lambda: isinstance(app.focused, PromptInput))  # the dialog's worker is done


async def test_create_agent_and_chat(tmp_path, tiny_loaded):
    app = app_for(tmp_path, tiny_loaded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await new_agent(pilot, app, "writer", system="You write.", max_tokens="40")
        assert "writer" in tiers(app)
        _, history = app.engine.get_agent("writer")
        assert history == []
        answer = await send(pilot, app, "Hello, world!")
        assert [m.role for m in app.query(ChatMessage)] == ["user", "assistant"]
        stats = str(answer.query_one(".stats").render())
        assert "tokens" in stats and "prompt" in stats
        info, history = app.engine.get_agent("writer")
        assert info.system_prompt == "You write." and history[0]["content"] == "Hello, world!"
        assert answer.markdown.source == history[1]["content"]


async def test_switch_save_evict_and_resume_after_restart(tmp_path, tiny_loaded):
    app = app_for(tmp_path, tiny_loaded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await new_agent(pilot, app, "alpha")
        await send(pilot, app, "first agent here")
        await new_agent(pilot, app, "beta")
        await send(pilot, app, "second agent here")
        # Switch back to alpha from the list.
        table = app.query_one(AgentList)
        table.focus()
        await until(pilot, lambda: table.row_count == 2)
        row = next(i for i in range(table.row_count) if table.coordinate_to_cell_key((i, 0)).row_key.value == "alpha")
        table.move_cursor(row=row)
        await pilot.press("enter")
        await until(pilot, lambda: app.current == "alpha")
        await until(pilot, lambda: any(m.markdown.source == "first agent here" for m in app.query(ChatMessage)))
        # Save, then evict alpha (letters act on the focused list).
        table.focus()
        await pilot.press("s")
        await until(pilot, lambda: not next(a for a in app.engine.snapshot(fresh=True).agents if a.id == "alpha").dirty)
        await pilot.press("e")
        await until(pilot, lambda: tiers(app)["alpha"] == "cold")
        await pilot.press("ctrl+q")

    restarted = app_for(tmp_path, tiny_loaded)
    async with restarted.run_test(size=SIZE) as pilot:
        await ready(pilot, restarted)
        assert tiers(restarted) == {"alpha": "cold", "beta": "cold"}
        # The most recently used agent opens with its history; resume alpha from disk.
        await restarted.open_agent("alpha")
        await until(pilot, lambda: any(m.markdown.source == "first agent here" for m in restarted.query(ChatMessage)))
        answer = await send(pilot, restarted, "and again")
        stats = str(answer.query_one(".stats").render())
        cached = int(stats.split("(")[1].split(" cached")[0])
        assert cached > 10, stats  # resumed from the saved cache, not recomputed
        assert tiers(restarted)["alpha"] == "hot"


async def test_rename_pin_fork_export_delete(tmp_path, tiny_loaded):
    app = app_for(tmp_path, tiny_loaded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await new_agent(pilot, app, "gamma")
        await send(pilot, app, "some words")
        app.query_one(AgentList).focus()
        await pilot.press("r")
        await until(pilot, lambda: app.screen.query("#value"))
        app.screen.query_one("#value").value = "Gamma Ray"
        await pilot.press("enter")
        await until(pilot, lambda: any(a.name == "Gamma Ray" for a in app.engine.snapshot(fresh=True).agents))
        await pilot.press("p")
        await until(pilot, lambda: next(a for a in app.engine.snapshot(fresh=True).agents if a.id == "gamma").pinned)
        await pilot.press("x")
        await until(pilot, lambda: (tmp_path / "gamma.md").exists())
        assert "some words" in (tmp_path / "gamma.md").read_text()
        await pilot.press("f")
        await until(pilot, lambda: len(tiers(app)) == 2 and app.current != "gamma")
        fork_id = app.current
        info = next(a for a in app.engine.snapshot(fresh=True).agents if a.id == fork_id)
        assert info.forked_from == "gamma" and info.tokens > 0
        app.query_one(AgentList).focus()
        await pilot.press("delete")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: fork_id not in tiers(app))


@pytest.mark.real_model
async def test_escape_stops_an_answer(tmp_path, real_loaded):
    app = app_for(tmp_path, real_loaded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await new_agent(pilot, app, "talker", max_tokens="2000", temperature="0")
        app.query_one(PromptInput).post_message(PromptInput.Submitted("Write a very long story about a dragon."))
        await until(pilot, lambda: "talker" in app.handles)
        await pilot.pause(1.0)
        await pilot.press("escape")
        await until(pilot, lambda: _finished(app, 0))
        stats = str(list(app.query(ChatMessage))[-1].query_one(".stats").render())
        assert "cancelled" in stats
        info = next(a for a in app.engine.snapshot(fresh=True).agents if a.id == "talker")
        assert not info.running and info.tokens < 2000


async def test_screens_help_and_command_palette(tmp_path, tiny_loaded):
    app = app_for(tmp_path, tiny_loaded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, PoolInspector))
        await pilot.press("escape")
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert "Message" in app.screen.text  # help for the focused input box
        # The gauges and the agent list keep refreshing underneath a modal screen.
        app.engine.create_agent("made-while-help-open")
        await pilot.pause(0.8)
        assert isinstance(app.screen, HelpScreen)
        assert "made-while-help-open" in [row.value for row in app.query_one(AgentList).rows]
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("New agent", "Save agent", "Evict agent", "Fork agent", "Delete agent", "Pool inspector"):
            assert title in titles


async def test_small_terminal_still_works(tmp_path, tiny_loaded):
    app = app_for(tmp_path, tiny_loaded)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        assert app.screen.has_class("narrow")
        await send(pilot, app, "hi")
        assert len(app.query(ChatMessage)) == 2


async def test_embedded_api_serves_the_same_engine(tmp_path, tiny_loaded):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = app_for(tmp_path, tiny_loaded, serve_api=True, server_port=port)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await until(pilot, lambda: app.api_state.startswith("http"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await until(pilot, lambda: True)
            for _ in range(50):
                try:
                    r = await client.post("/v1/agents", json={"id": "from-http"})
                    break
                except httpx.ConnectError:
                    await pilot.pause(0.1)
            assert r.status_code == 201
        await until(
            pilot,
            lambda: any(
                app.query_one(AgentList).coordinate_to_cell_key((i, 0)).row_key.value == "from-http"
                for i in range(app.query_one(AgentList).row_count)
            ),
        )
        await pilot.press("ctrl+q")


async def test_busy_port_is_a_notification_not_a_crash(tmp_path, tiny_loaded):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        app = app_for(tmp_path, tiny_loaded, serve_api=True, server_port=port)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot, app)
            await until(pilot, lambda: app.api_state.startswith("off"))
            assert "busy" in app.api_state
            await until(pilot, lambda: any("in use" in n.message for n in app._notifications))
            await send(pilot, app, "still works")


@pytest.mark.real_model
async def test_real_model_answer_streams_into_the_chat(tmp_path, real_loaded):
    app = app_for(tmp_path, real_loaded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await new_agent(pilot, app, "geo", temperature="0")
        # Post the message rather than typing Enter: Pilot's key presses wait for the process to be
        # idle, which it is not until the answer is complete.
        prompt = app.query_one(PromptInput)
        prompt.post_message(PromptInput.Submitted("What is the capital of France?"))
        lengths = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not _finished(app, 0) and loop.time() < deadline:
            messages = list(app.query(ChatMessage))
            if messages and messages[-1].role == "assistant":
                lengths.append(len(messages[-1].markdown.source))
            await pilot.pause(0.02)
        answer = list(app.query(ChatMessage))[-1]
        final = answer.markdown.source
        assert "Paris" in final
        assert len({n for n in lengths if 0 < n < len(final)}) >= 2, "the text should appear piece by piece"
        stats = str(answer.query_one(".stats").render())
        assert "ttft" in stats and "tok/s" in stats


async def test_request_rate_is_its_own_servers_and_absent_without_a_server(tmp_path, tiny_loaded, server_factory):
    """Another server in the same process served requests: a TUI without an API shows no rate at
    all, and a TUI with its own API counts only the requests its server answered."""
    import socket

    other = server_factory()
    for _ in range(20):
        assert httpx.get(f"{other.url}/v1/models").status_code == 200

    def api_text(app) -> str:
        return str(app.query_one("#api-text").render())

    app = app_for(tmp_path, tiny_loaded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await until(pilot, lambda: "off" in api_text(app))
        await pilot.pause(1.2)  # past one rate window
        assert "req/s" not in api_text(app)
        await pilot.press("ctrl+q")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = app_for(tmp_path / "second", tiny_loaded, serve_api=True, server_port=port)
    async with served.run_test(size=SIZE) as pilot:
        await ready(pilot, served)
        await until(pilot, lambda: "req/s" in api_text(served))
        await pilot.pause(1.2)
        assert "0.0 req/s" in api_text(served)  # the other server's 20 requests are not its own
        assert served.engine.metrics.requests_served() == 0
        await pilot.press("ctrl+q")


async def test_remote_view_shows_each_instance_read_only(tmp_path, tiny_loaded):
    """`semantic tui --remote`: a live instance's agents and gauges, and an unreachable one said so."""
    from semantic_tui.remote import RemoteApp
    from tests.api_server import ServerThread

    settings = make_settings(tmp_path, agent_cache_dir=tmp_path / "remote-cache")
    server = await asyncio.to_thread(lambda: ServerThread(settings, tiny_loaded).start())
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            for name in ("alpha", "beta"):
                r = await client.post("/v1/agents", json={"id": name}, headers={"content-type": "application/json"})
                assert r.status_code == 201, r.text
        app = RemoteApp([server.url, "http://127.0.0.1:9"], interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: len(app.states) == 2 and app.query_one("#agents-0").row_count == 2)
            live = str(app.query_one("#summary-0").render())
            assert "ready" in live and "agents 2" in live
            assert "unreachable" in str(app.query_one("#summary-1").render())
            gauge = app.query_one("#pool-0")  # the pool gauge follows the instance's metric
            assert gauge.progress == pytest.approx(100 * app.states[server.url]["pool_ratio"])
            # Read-only: the agents are listed as the instance has them, and nothing in the app changes them.
            rows = [app.query_one("#agents-0").get_row_at(i)[0] for i in range(2)]
            assert rows == ["alpha", "beta"]
            await pilot.press("r")
            await pilot.press("q")
    finally:
        await asyncio.to_thread(server.stop)
