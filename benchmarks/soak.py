"""Soak: 32 concurrent streaming clients against a real `semantic serve` for 60 s, on a pool too small for them.

The server runs the default model in a subprocess (loopback, a temporary agent folder) with a KV budget
of SEMANTIC_MLX_CACHE_BUDGET_MB (default here 64 MB: about 1,400 tokens, a handful of the 32 agents),
so agents are evicted to disk and read back all the time. Each client is one named agent holding a
conversation: it sends its last few messages plus a new one (5 to 40 words), streamed, max_tokens 4 to
24, temperature 0.7, and checks every stream is well-formed (event order, JSON, text). Every second the
server's resident memory (/proc) and the pool utilization (/metrics) are sampled.

Reported: requests completed and failed, malformed streams, TTFT p50/p95, the highest pool utilization
seen, resident memory after warm-up against the end, and whether every agent is intact afterwards (hot,
or on disk and loadable).
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Report, fmt, make_parser, median, percentile, progress, running_server

WORDS = [
    "agent",
    "cache",
    "memory",
    "block",
    "disk",
    "token",
    "prompt",
    "answer",
    "batch",
    "stream",
    "model",
    "server",
    "client",
    "pool",
    "evict",
    "resume",
    "context",
    "history",
    "turn",
    "quick",
    "brown",
    "fox",
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pool_utilization(metrics_text: str) -> float | None:
    for line in metrics_text.splitlines():
        if line.startswith("semantic_pool_utilization_ratio "):
            return float(line.split()[1])
    return None


def check_stream(lines: list[str]) -> tuple[str, bool]:
    """The text of a streamed answer, and whether its frames were well-formed."""
    events = [line[7:] for line in lines if line.startswith("event: ")]
    try:
        datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    except json.JSONDecodeError:
        return "", False
    ok = (
        events[:2] == ["message_start", "content_block_start"]
        and events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        and set(events[2:-3]) <= {"content_block_delta", "ping"}
        and [d.get("type") for d in datas] == events
    )
    text = "".join(d["delta"]["text"] for d in datas if d.get("type") == "content_block_delta")
    return text, ok


async def soak(url: str, pid: int, clients: int, seconds: float) -> dict[str, Any]:
    import httpx

    stats: dict[str, Any] = {"ok": 0, "failed": [], "malformed": 0, "ttft": [], "rss": [], "pool": []}
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def sampler() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while time.monotonic() < deadline:
                stats["rss"].append((time.monotonic() - started, rss_mb(pid)))
                try:
                    util = pool_utilization((await http.get("/metrics")).text)
                    if util is not None:
                        stats["pool"].append(util)
                except httpx.HTTPError as exc:
                    stats["failed"].append(f"metrics: {exc!r}")
                await asyncio.sleep(1.0)

    async def client(i: int) -> None:
        rng = random.Random(i)
        history: list[dict[str, str]] = []
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            while time.monotonic() < deadline:
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                history.append({"role": "user", "content": f"client {i}: {words}"})
                window = history[-5:]
                while window[0]["role"] != "user":
                    window = window[1:]
                body = {
                    "model": "default",
                    "max_tokens": rng.randint(4, 24),
                    "stream": True,
                    "temperature": 0.7,
                    "messages": window,
                }
                sent = time.monotonic()
                first: float | None = None
                lines: list[str] = []
                try:
                    async with http.stream(
                        "POST", "/v1/messages", json=body, headers={"x-agent-id": f"soak-{i:02d}"}
                    ) as r:
                        if r.status_code != 200:
                            stats["failed"].append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                            return
                        async for line in r.aiter_lines():
                            if line:
                                if first is None and line.startswith("event: content_block_delta"):
                                    first = time.monotonic() - sent
                                lines.append(line)
                except httpx.HTTPError as exc:
                    stats["failed"].append(repr(exc))
                    return
                text, ok = check_stream(lines)
                if not ok:
                    stats["malformed"] += 1
                    return
                stats["ok"] += 1
                if first is not None:
                    stats["ttft"].append(first)
                history.append({"role": "assistant", "content": text or "..."})

    await asyncio.gather(sampler(), *(client(i) for i in range(clients)))
    stats["elapsed"] = time.monotonic() - started
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        agents = (await http.get("/v1/agents")).json()["data"]
        stats["agents"] = len(agents)
        stats["intact"] = sum(1 for a in agents if not a["damaged"] and (a["tier"] == "hot" or a["saved"]))
        cold = [a["id"] for a in agents if a["tier"] != "hot"]
        stats["reloaded"] = None
        if cold:
            r = await http.post(f"/v1/agents/{cold[0]}/load")
            stats["reloaded"] = r.status_code == 200 and r.json().get("tier") == "hot"
    return stats


def main() -> None:
    parser = make_parser(
        "Soak: concurrent streaming clients against a real server on a pool too small for them.", epilog=__doc__
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, help="default 60; 15 with --quick")
    parser.add_argument("--budget-mb", type=float, default=64.0, help="SEMANTIC_MLX_CACHE_BUDGET_MB (default 64)")
    args = parser.parse_args()
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    report = Report("soak", f"Soak: {args.clients} streaming clients for {seconds:.0f} s on a tight pool", args.quick)
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            "SEMANTIC_MLX_CACHE_BUDGET_MB": str(args.budget_mb),
            "SEMANTIC_SERVER_RATE_LIMIT_PER_CLIENT": "0",
            "SEMANTIC_SERVER_RATE_LIMIT_GLOBAL": "0",
        }
        progress("starting `semantic serve` and waiting for the model to load")
        with running_server(tmp / "server.log", tmp / "cache", env=env) as (url, proc):
            progress(f"{args.clients} clients for {seconds:.0f} s")
            stats = asyncio.run(soak(url, proc.pid, args.clients, seconds))
    rss = stats["rss"]
    warm = [mb for t, mb in rss if seconds * 0.25 <= t < seconds * 0.5]
    end = [mb for t, mb in rss if t >= seconds * 0.75]
    growth = (median(end) / median(warm) - 1) if warm and end else float("nan")
    ttft = stats["ttft"]
    report.table(
        "Requests",
        [
            "completed",
            "failed",
            "malformed streams",
            "requests/s",
            "TTFT p50 s",
            "TTFT p95 s",
            "highest pool utilization",
            "agents intact",
        ],
        [
            [
                str(stats["ok"]),
                str(len(stats["failed"])),
                str(stats["malformed"]),
                fmt(stats["ok"] / stats["elapsed"]),
                fmt(median(ttft)),
                fmt(percentile(ttft, 95)),
                fmt(max(stats["pool"], default=float("nan"))),
                f"{stats['intact']}/{stats['agents']}",
            ]
        ],
    )
    report.table(
        "Server resident memory, MB",
        ["at start", "after warm-up (median, 25-50% of the run)", "end (median, last 25%)", "growth after warm-up"],
        [[fmt(rss[0][1]) if rss else "-", fmt(median(warm)), fmt(median(end)), f"{growth:+.1%}"]],
    )
    for failure in stats["failed"][:5]:
        report.note(f"failure: {failure}")
    if stats["reloaded"] is not None:
        report.note(f"an agent evicted to disk loaded back hot afterwards: {stats['reloaded']}")
    report.goal(
        "failed requests and malformed streams",
        "0",
        str(len(stats["failed"]) + stats["malformed"]),
        not stats["failed"] and stats["malformed"] == 0,
    )
    report.goal(
        "pool budget respected",
        "utilization <= 1",
        fmt(max(stats["pool"], default=float("nan"))),
        bool(stats["pool"]) and max(stats["pool"]) <= 1.0,
    )
    report.goal("memory flat after warm-up", "growth < 10%", f"{growth:+.1%}", growth < 0.10)
    report.goal("every agent intact", "all", f"{stats['intact']}/{stats['agents']}", stats["intact"] == stats["agents"])
    report.results.update({k: v for k, v in stats.items() if k not in ("rss", "ttft", "pool")})
    report.results.update({"rss_mb": rss, "ttft_s": ttft, "pool_utilization": stats["pool"], "growth": growth})
    report.finish(args.json)


if __name__ == "__main__":
    main()
