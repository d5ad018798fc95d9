"""Render the README screenshots from a headless run of the real workstation.

    python screenshots/make_screenshots.py            # writes screenshots/*.svg and *.png

Uses the default model, a temporary agents folder and no HTTP server. PNGs need cairosvg (in the test
extras) and the cairo library.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import semantic_core  # noqa: E402,F401  (chooses the BLAS before mlx is imported)
from semantic_core.config import load_settings  # noqa: E402
from semantic_core.runtime import Runtime  # noqa: E402
from semantic_tui.app import SemanticApp  # noqa: E402
from semantic_tui.widgets.chat import ChatMessage  # noqa: E402
from semantic_tui.widgets.prompt import PromptInput  # noqa: E402

CONVERSATIONS = [
    (
        "geographer",
        "Geographer",
        "You are a concise geography tutor.",
        ["What is the capital of France?", "And what river flows through it?"],
    ),
    ("poet", "Poet", "You write short poems.", ["Write a four-line poem about the sea."]),
    ("coder", "Coder", "You are a helpful Python programmer.", ["Write a Python function that reverses a string."]),
]


async def wait(pilot, condition, timeout: float = 300.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("the UI did not get there in time")
        await pilot.pause(0.1)


async def chat(app: SemanticApp, pilot, text: str) -> None:
    before = len(app.query(ChatMessage))
    app.query_one(PromptInput).post_message(PromptInput.Submitted(text))

    def done() -> bool:
        messages = list(app.query(ChatMessage))
        return (
            len(messages) >= before + 2
            and app.current not in app.handles
            and "tokens" in str(messages[-1].query_one(".stats").render())
        )

    await wait(pilot, done)


async def render(out: Path) -> list[Path]:
    workdir = Path(tempfile.mkdtemp(prefix="semantic-shots-"))
    settings = load_settings(agent_cache_dir=workdir / "cache", mlx_cache_budget_mb=64)
    app = SemanticApp(Runtime(settings, serve_api=False), clock=False, export_dir=workdir)
    written: list[Path] = []
    async with app.run_test(size=(150, 42)) as pilot:
        await wait(
            pilot,
            lambda: (
                app.engine.ready and app.engine.info is not None and app.sub_title.startswith(app.engine.info.model_id)
            ),
        )
        from semantic_core.agents.record import Sampling

        for agent_id, name, system, turns in CONVERSATIONS:
            await asyncio.to_thread(
                app.engine.create_agent,
                agent_id,
                display_name=name,
                system_prompt=system,
                sampling=Sampling(temperature=0.0, max_tokens=120),
            )
            await app.open_agent(agent_id)
            for turn in turns:
                await chat(app, pilot, turn)
        await app.open_agent("geographer")
        await pilot.pause(1.0)
        written.append(out / "main.svg")
        app.save_screenshot(str(written[-1]))
        await pilot.press("f3")
        await pilot.pause(1.0)
        written.append(out / "pool-inspector.svg")
        app.save_screenshot(str(written[-1]))
        await pilot.press("escape")
        await pilot.resize_terminal(80, 24)
        await pilot.pause(1.0)
        written.append(out / "small-terminal.svg")
        app.save_screenshot(str(written[-1]))
        await app.action_quit()
    return written


async def render_remote(out: Path) -> list[Path]:
    """`semantic tui --cluster`: two instances of a cluster, watched read-only."""
    import httpx

    from semantic_tui.cluster import Cluster
    from semantic_tui.remote import RemoteApp

    workdir = Path(tempfile.mkdtemp(prefix="semantic-shots-cluster-"))
    cluster = Cluster(
        state_dir=workdir / "state",
        port=18180,
        base_port=18181,
        env={
            "SEMANTIC_AGENT_CACHE_DIR": str(workdir / "cache"),
            "SEMANTIC_SERVER_LOG_LEVEL": "WARNING",
            "SEMANTIC_MLX_CACHE_BUDGET_MB": "4",  # a small pool, so that its gauge shows
        },
    )
    written: list[Path] = []
    try:
        for _ in range(2):
            cluster.add_instance()
        await asyncio.to_thread(cluster.wait_ready)
        await asyncio.to_thread(cluster.start_haproxy)
        async with httpx.AsyncClient(base_url="http://127.0.0.1:18180", timeout=120) as client:
            for agent_id, _name, system, turns in CONVERSATIONS:
                body = {
                    "model": "smollm2-135m-instruct",
                    "max_tokens": 24,
                    "system": system,
                    "messages": [{"role": "user", "content": turns[0]}],
                }
                await client.post("/v1/messages", json=body, headers={"x-agent-id": agent_id})
        app = RemoteApp([i.url for i in cluster.instances.values()], interval=0.5)
        async with app.run_test(size=(150, 30)) as pilot:
            await wait(pilot, lambda: len(app.states) == 2)
            await pilot.pause(1.0)
            written.append(out / "remote.svg")
            app.save_screenshot(str(written[-1]))
    finally:
        cluster.stop()
    return written


def main() -> None:
    svgs = asyncio.run(render(HERE))
    svgs += asyncio.run(render_remote(HERE))
    try:
        import cairosvg
    except Exception as exc:  # the library or libcairo is missing
        print(f"SVGs written; PNGs skipped ({exc})")
        return
    for svg in svgs:
        cairosvg.svg2png(url=str(svg), write_to=str(svg.with_suffix(".png")), output_width=1600)
        print(f"wrote {svg.name} and {svg.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
