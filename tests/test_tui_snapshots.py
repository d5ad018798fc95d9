"""Snapshot tests of the main screen and the pool inspector (pytest-textual-snapshot).

The state is built through the real engine on the tiny model, with nothing time-dependent on screen
(no clock, no timings, no generation on the main screen). Update with `pytest --snapshot-update`.
"""

from __future__ import annotations

import asyncio

from semantic_core.engine.types import GenerationRequest
from tests.test_tui import app_for, ready, until


async def _agents(app) -> None:
    engine = app.engine
    await asyncio.to_thread(
        engine.create_agent, "researcher", display_name="Researcher", system_prompt="You find sources."
    )
    await asyncio.to_thread(engine.create_agent, "writer", display_name="Writer")


def test_main_screen(snap_compare, tmp_path, tiny_loaded):
    app = app_for(tmp_path, tiny_loaded)

    async def run_before(pilot) -> None:
        await ready(pilot, app)
        await _agents(app)
        await app.open_agent("researcher")
        await until(pilot, lambda: app.query_one("AgentList").row_count == 2)
        app.query_one("PromptInput").cursor_blink = False  # a blinking cursor makes the picture random
        await pilot.pause(0.6)

    assert snap_compare(app, terminal_size=(130, 34), run_before=run_before)


def test_pool_inspector(snap_compare, tmp_path, tiny_loaded):
    app = app_for(tmp_path, tiny_loaded)

    async def run_before(pilot) -> None:
        await ready(pilot, app)
        engine = app.engine
        for agent_id, text in (
            ("alpha", "The quick brown fox jumps over the lazy dog. " * 8),
            ("beta", "Agents keep their context in a KV cache. " * 4),
        ):
            tokens = engine.render([{"role": "user", "content": text}]).tokens
            await asyncio.to_thread(
                engine.complete, GenerationRequest(tokens=tokens, max_tokens=8, temperature=0.0, agent_id=agent_id)
            )
        await asyncio.to_thread(engine.fork_agent, "alpha", "alpha-copy")
        await pilot.press("f3")
        await pilot.pause(1.0)

    assert snap_compare(app, terminal_size=(110, 30), run_before=run_before)
