"""What the HTTP layer costs: probe latency on a real server, and the per-request cost of each
middleware.

1. A real server: `semantic serve` in a subprocess on a free local port (its own temporary agent
   folder), measured once the model is loaded (/health/ready answers 200). GET /health/live is
   timed by an asyncio httpx client over keep-alive connections (1 and 8 at once), and, when `wrk`
   is installed, by wrk with the same connection counts (C, so the client adds little).
2. The middleware stack in-process: FastAPI apps that differ only in their middleware serve a
   trivial endpoint (GET /v1/bench, returns a small JSON object); each is called as an ASGI app
   with a synthetic scope, receive and send, thousands of times per batch, the variants interleaved
   round by round so drift cancels. The difference to the app without middleware, per round and
   then the median, is what a middleware adds per request. Logging is configured as the server
   does (structlog console renderer at INFO) with the handler writing to /dev/null, so each access
   log line is really formatted. Rate limits are raised so that the limiter runs but never refuses.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Report, fmt, make_parser, median, percentile, progress, running_server

PROBE = "/health/live"
BENCH_PATH = "/v1/bench"
UNLIMITED = 10**9  # requests per minute: the limiter does its work but never says no

_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"p50_us\\": %d, \\"p95_us\\": %d, \\"p99_us\\": %d, \\"mean_us\\": %f, \\"requests\\": %d, "
    .. "\\"duration_us\\": %d, \\"errors\\": %d}\\n",
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, summary.requests,
    summary.duration, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


# 1. A real server -----------------------------------------------------------------------------------------


async def httpx_load(url: str, connections: int, seconds: float) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        for _ in range(100):  # warm up: connections open, code paths hot
            await client.get(PROBE)
        latencies: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.get(PROBE)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    return _latency_summary(latencies, elapsed, errors)


def _latency_summary(latencies: list[float], elapsed: float, errors: int) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms),
        "errors": errors,
        "rps": len(ms) / elapsed,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms),
    }


def wrk_load(url: str, connections: int, seconds: float, script: Path) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script), url + PROBE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON ") :])
            return {
                "requests": d["requests"],
                "errors": d["errors"],
                "rps": d["requests"] / (d["duration_us"] / 1e6),
                "p50_ms": d["p50_us"] / 1000,
                "p95_ms": d["p95_us"] / 1000,
                "p99_ms": d["p99_us"] / 1000,
                "mean_ms": d["mean_us"] / 1000,
            }
    raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")


# 2. The middleware stack, in-process ---------------------------------------------------------------------


def build_apps(settings: Any) -> dict[str, Any]:
    from fastapi import FastAPI

    from semantic_core.api.app import create_app
    from semantic_core.api.middleware import (
        AccessLogMiddleware,
        AuthMiddleware,
        BodySizeLimitMiddleware,
        MetricsMiddleware,
        RateLimitMiddleware,
        RequestIDMiddleware,
    )
    from semantic_core.engine.engine import Engine

    async def trivial() -> dict[str, bool]:
        return {"ok": True}

    def app_with(*middleware: tuple[Any, dict[str, Any]]) -> Any:
        app = FastAPI()
        app.add_api_route(BENCH_PATH, trivial, methods=["GET"])
        for cls, options in middleware:  # innermost first, as create_app adds them
            app.add_middleware(cls, **options)
        return app

    full = create_app(Engine(settings), settings)  # the engine is never started: the endpoint does not use it
    full.add_api_route(BENCH_PATH, trivial, methods=["GET"])
    all_middleware = [
        (BodySizeLimitMiddleware, {"max_bytes": int(settings.server_max_body_mb * 1024 * 1024)}),
        (RateLimitMiddleware, {"per_agent": UNLIMITED, "global_": UNLIMITED}),
        (AuthMiddleware, {"keys": settings.api_keys}),
        (MetricsMiddleware, {}),
        (AccessLogMiddleware, {}),
        (RequestIDMiddleware, {}),
    ]
    return {
        "none": app_with(),
        "metrics only": app_with((MetricsMiddleware, {})),
        "access log only": app_with((AccessLogMiddleware, {})),
        "request id only": app_with((RequestIDMiddleware, {})),
        "all middleware": app_with(*all_middleware),
        "create_app (full app)": full,
    }


async def time_asgi(apps: dict[str, Any], rounds: int, calls: int) -> dict[str, list[float]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": BENCH_PATH,
        "raw_path": BENCH_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    statuses: dict[str, int] = {}
    current = ""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[current] = message["status"]

    names = list(apps)
    for name in names:  # warm up each, and check that it answers 200
        current = name
        for _ in range(50):
            await apps[name](dict(scope), receive, send)
        if statuses.get(name) != 200:
            raise RuntimeError(f"{name}: the trivial endpoint answered {statuses.get(name)}")
    per_call: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for name in order:
            app = apps[name]
            current = name
            t0 = time.perf_counter()
            for _ in range(calls):
                await app(dict(scope), receive, send)
            per_call[name].append((time.perf_counter() - t0) / calls)
    return per_call


def main() -> None:
    parser = make_parser(
        "Probe latency on a real server (httpx and wrk) and the per-request cost of each "
        "middleware (direct ASGI calls).",
        epilog=__doc__,
    )
    parser.add_argument("--seconds", type=float, help="seconds per load level (default 5; 1.5 with --quick)")
    parser.add_argument(
        "--connections", type=int, nargs="+", help="concurrent connections (default 1 8; 1 with --quick)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the ASGI timing (default 25; 5 with --quick)")
    parser.add_argument("--calls", type=int, help="ASGI calls per variant per round (default 1000; 200 with --quick)")
    parser.add_argument("--no-server", action="store_true", help="skip the real server (part 1)")
    args = parser.parse_args()

    import semantic_core  # noqa: F401  (chooses the BLAS before anything imports mlx)
    from semantic_core.config import Settings
    from semantic_core.observability import configure_logging

    report = Report("http_overhead", "HTTP: probe latency on a real server, per-request middleware cost", args.quick)
    seconds = args.seconds or (1.5 if args.quick else 5.0)
    levels = args.connections or ([1] if args.quick else [1, 8])
    rounds = args.rounds or (5 if args.quick else 25)
    calls = args.calls or (200 if args.quick else 1000)
    wrk = shutil.which("wrk")

    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp_name:
        tmp = Path(tmp_name)
        live: dict[str, dict[str, Any]] = {}
        if not args.no_server:
            progress("starting `semantic serve` and waiting for the model to load")
            script = tmp / "report.lua"
            script.write_text(_WRK_SCRIPT)
            with running_server(tmp / "server.log", tmp / "cache") as (url, _proc):
                for n in levels:
                    progress(f"GET {PROBE}: httpx, {n} connection(s), {seconds} s")
                    live[f"httpx c={n}"] = asyncio.run(httpx_load(url, n, seconds))
                    if wrk:
                        progress(f"GET {PROBE}: wrk, {n} connection(s), {seconds} s")
                        live[f"wrk c={n}"] = wrk_load(url, n, seconds, script)
            rows = [
                [
                    name,
                    fmt(d["p50_ms"]),
                    fmt(d["p95_ms"]),
                    fmt(d["p99_ms"]),
                    fmt(d["mean_ms"]),
                    fmt(d["rps"]),
                    f"{d['requests']:,}",
                    str(d["errors"]),
                ]
                for name, d in live.items()
            ]
            report.table(
                f"GET {PROBE} on `semantic serve` (keep-alive), milliseconds",
                ["client", "p50", "p95", "p99", "mean", "req/s", "requests", "errors"],
                rows,
            )
            first = f"httpx c={levels[0]}"
            if levels[0] == 1:
                report.goal(
                    f"p95 GET {PROBE}, httpx, 1 connection",
                    "< 2 ms",
                    f"{fmt(live[first]['p95_ms'])} ms",
                    live[first]["p95_ms"] < 2.0,
                )
                if wrk:
                    w = live["wrk c=1"]
                    report.goal(
                        f"p95 GET {PROBE}, wrk, 1 connection", "< 2 ms", f"{fmt(w['p95_ms'])} ms", w["p95_ms"] < 2.0
                    )
            if not wrk:
                report.note("wrk is not installed (apt-get install wrk): only the httpx client was used.")
            report.note(
                "Client and server share this machine's cores; the httpx client's own Python time is "
                "part of its latencies, wrk's much less so."
            )

        progress(f"middleware: {rounds} rounds x {calls} ASGI calls per variant")
        devnull = open(os.devnull, "w")  # noqa: SIM115  (held for the whole timing)
        configure_logging("INFO", stream=devnull)
        settings = Settings(
            agent_cache_dir=tmp / "asgi", server_rate_limit_global=UNLIMITED, server_rate_limit_per_client=UNLIMITED
        )
        apps = build_apps(settings)
        per_call = asyncio.run(time_asgi(apps, rounds, calls))
        configure_logging("WARNING")
        devnull.close()

    base = per_call["none"]
    rows, added = [], {}
    for name, times in per_call.items():
        diffs = [(t - b) * 1e6 for t, b in zip(times, base, strict=True)]
        added[name] = {"per_call_us": median(times) * 1e6, "added_us": median(diffs) if name != "none" else 0.0}
        rows.append(
            [name, fmt(median(times) * 1e6), fmt(min(times) * 1e6), "-" if name == "none" else fmt(median(diffs))]
        )
    report.table(
        f"Trivial endpoint GET {BENCH_PATH} as direct ASGI calls, microseconds per request "
        f"({rounds} interleaved rounds x {calls} calls)",
        ["middleware", "median per call", "best round", "added vs none (median of paired rounds)"],
        rows,
    )
    m, a = added["metrics only"]["added_us"], added["access log only"]["added_us"]
    report.goal("metrics middleware, added per request", "< 0.5 ms", f"{fmt(m)} us", m < 500)
    report.goal("access-log middleware, added per request", "< 0.1 ms", f"{fmt(a)} us", a < 100)
    report.note(
        "create_app (full app) also routes past every API route and installs the error handlers; "
        "'all middleware' is the same middleware in the same order on the bare app."
    )
    report.results.update(
        {
            "live": live,
            "middleware": added,
            "per_call_s": per_call,
            "rounds": rounds,
            "calls": calls,
            "seconds_per_level": seconds,
            "wrk": bool(wrk),
        }
    )
    report.finish(args.json)


if __name__ == "__main__":
    main()
