"""Scale-out, side by side: 48 agents over 3 instances behind haproxy vs one instance, same total memory.

The workload is `multi_agent_vs_servers.py`'s: distinct conversations of about H tokens (default
400), each round every agent sends its whole history plus a new user turn of T tokens (32), streamed,
max_tokens=32, temperature 0, the answer appended for the next round. Here C clients (default 8) send
turns at once, each client walking its share of the agents, and every turn names its agent
(X-Agent-ID), as an agent framework does.

Both sides get the same KV budget in all, sized so that about a third of the agents fit:

- one: one `semantic serve` with SEMANTIC_MLX_CACHE_BUDGET_MB = B;
- cluster: `semantic cluster`'s three instances sharing one agents folder, each with B / 3, behind
  haproxy (consistent hash on X-Agent-ID).

Reported per side: time to first token (p50, p95) and turn time of round 1 (cold) and rounds 2..R
(warm), the wall time of all rounds (turns per second), prompt tokens served from caches, evictions,
and the summed resident memory of the instances. Both sides run on this machine: with fewer cores
than instances, the cluster shows what routing, handoffs and three model copies cost, not more
compute. The sides alternate (one, cluster, one, cluster with --reps 2), and the best run of each is
reported.

    .venv/bin/python benchmarks/cluster_scaling.py              # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/cluster_scaling.py --quick      # 12 agents, 2 rounds
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import Report, fmt_x, make_parser, progress, ratio, tree_rss_mb
from multi_agent_vs_servers import Tokenizer, build_agents, model_dir, scrape_metrics, stream_anthropic, user_turn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semantic_tui.cluster import Cluster, free_ports, haproxy_binary

MODEL = "smollm2-135m-instruct"


@dataclass
class Side:
    name: str
    instances: int
    budget_mb_each: float
    turns: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    rss_mb: float = 0.0
    evictions: float = 0.0
    loads: float = 0.0
    handoffs: int = 0
    start_s: float = 0.0


def run_side(side: Side, args: Any, agents_proto: list[Any], tok: Tokenizer, mdir: Path) -> Side:
    import copy

    agents = copy.deepcopy(agents_proto)
    work = Path(tempfile.mkdtemp(prefix=f"semantic-bench-{side.name}-"))
    base = free_ports(side.instances + 1)
    cluster = Cluster(
        clustered=side.instances > 1,  # one instance is a plain `semantic serve`
        state_dir=work / "state",
        port=base,
        base_port=base + 1,
        env={
            "SEMANTIC_MLX_MODEL_ID": str(mdir),
            "SEMANTIC_AGENT_CACHE_DIR": str(work / "cache"),
            "SEMANTIC_SERVER_LOG_LEVEL": "WARNING",
            "SEMANTIC_MLX_CACHE_BUDGET_MB": f"{side.budget_mb_each:g}",
            "SEMANTIC_SERVER_RATE_LIMIT_PER_CLIENT": "0",
            "SEMANTIC_SERVER_RATE_LIMIT_GLOBAL": "0",
        },
    )
    t0 = time.perf_counter()
    try:
        for _ in range(side.instances):
            cluster.add_instance()
        cluster.wait_ready(timeout=600)
        if side.instances > 1:
            cluster.start_haproxy()
            url = f"http://127.0.0.1:{base}"
        else:
            url = next(iter(cluster.instances.values())).url
        side.start_s = time.perf_counter() - t0
        lock = threading.Lock()
        with httpx.Client(timeout=600) as client:
            start = time.perf_counter()
            for round_no in range(1, args.rounds + 1):
                progress(f"{side.name}: round {round_no}/{args.rounds}")
                for a in agents:
                    a.messages.append({"role": "user", "content": user_turn(tok, a, round_no, args.turn_tokens)})
                groups = [agents[i :: args.clients] for i in range(args.clients)]

                def walk(group: list[Any], round_no: int = round_no) -> None:
                    with httpx.Client(timeout=600) as c:
                        for a in group:
                            ttft, total, text, _out, prompt, cached = stream_anthropic(
                                c, url, a, MODEL, args.max_tokens
                            )
                            a.messages.append({"role": "assistant", "content": text})
                            with lock:
                                side.turns.append(
                                    {
                                        "round": round_no,
                                        "ttft": ttft,
                                        "total": total,
                                        "prompt": prompt or 0,
                                        "cached": cached or 0,
                                    }
                                )

                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(walk, groups))
            side.wall_s = time.perf_counter() - start
            urls = [i.url for i in cluster.instances.values()]
            scraped = [scrape_metrics(client, u) for u in urls]
            side.evictions = sum(m.get("semantic_evictions_total", 0.0) for m in scraped)
            side.loads = sum(m.get("semantic_agent_loads_total", 0.0) for m in scraped)
        side.rss_mb = sum(sum(tree_rss_mb(i.process.pid)) for i in cluster.instances.values() if i.process)
        for inst in cluster.instances.values():
            log = inst.log_path.read_text(errors="replace") if inst.log_path else ""
            side.handoffs += log.count("agent taken over")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return side


def summary(side: Side) -> dict[str, Any]:
    def stats(turns: list[dict[str, float]]) -> dict[str, float]:
        if not turns:
            return {}
        ttft = sorted(t["ttft"] for t in turns)
        return {
            "turns": len(turns),
            "ttft_p50_ms": statistics.median(ttft) * 1000,
            "ttft_p95_ms": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] * 1000,
            "turn_mean_ms": statistics.fmean(t["total"] for t in turns) * 1000,
            "cached_share": sum(t["cached"] for t in turns) / max(1, sum(t["prompt"] for t in turns)),
        }

    return {
        "side": side.name,
        "instances": side.instances,
        "budget_mb_each": side.budget_mb_each,
        "cold": stats([t for t in side.turns if t["round"] == 1]),
        "warm": stats([t for t in side.turns if t["round"] > 1]),
        "wall_s": side.wall_s,
        "turns_per_s": len(side.turns) / side.wall_s if side.wall_s else 0.0,
        "rss_mb_total": side.rss_mb,
        "evictions": side.evictions,
        "loads": side.loads,
        "handoffs": side.handoffs,
        "start_s": side.start_s,
    }


def main() -> int:
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=48)
    p.add_argument("--history-tokens", type=int, default=400)
    p.add_argument("--turn-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--fit", type=float, default=1 / 3, help="share of the agents the total budget holds")
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.agents, args.rounds, args.history_tokens = 12, 2, 200
    if haproxy_binary() is None:
        print("haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 2
    mdir = model_dir()
    tok = Tokenizer(mdir)
    agents = build_agents(tok, args.agents, args.history_tokens, seed=7)
    # SmolLM2's cache at its default 8-bit KV: bytes per token from its config.
    cfg = json.loads((mdir / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * (head_dim + 2 * 2 * head_dim / 64)
    longest = args.history_tokens + args.rounds * (args.turn_tokens + args.max_tokens + 24)
    total_mb = max(24.0, args.agents * args.fit * longest * per_token / 2**20 * 1.3)
    progress(f"{args.agents} agents, total KV budget {total_mb:.0f} MB (about {args.fit:.0%} of the agents)")
    results: dict[str, Side] = {}
    for _ in range(args.reps):
        for name, n in (("one instance", 1), ("3 instances + haproxy", 3)):
            side = run_side(Side(name, n, total_mb / n), args, agents, tok, mdir)
            best = results.get(name)
            if best is None or side.wall_s < best.wall_s:
                results[name] = side
    rows = [summary(s) for s in results.values()]
    one, three = rows
    report = Report(
        "cluster_scaling",
        f"{args.agents} agents on 3 instances behind haproxy vs one instance, total KV budget {total_mb:.0f} MB "
        f"({args.rounds} rounds, {args.clients} clients, ~{args.history_tokens}-token histories)",
        args.quick,
    )
    measures = [
        ("cold TTFT p50 ms", one["cold"]["ttft_p50_ms"], three["cold"]["ttft_p50_ms"]),
        ("warm TTFT p50 ms", one["warm"]["ttft_p50_ms"], three["warm"]["ttft_p50_ms"]),
        ("warm TTFT p95 ms", one["warm"]["ttft_p95_ms"], three["warm"]["ttft_p95_ms"]),
        ("warm turn mean ms", one["warm"]["turn_mean_ms"], three["warm"]["turn_mean_ms"]),
        ("turns per second", one["turns_per_s"], three["turns_per_s"]),
        ("warm prompt share from cache", one["warm"]["cached_share"], three["warm"]["cached_share"]),
        ("agent loads from disk", one["loads"], three["loads"]),
        ("evictions", one["evictions"], three["evictions"]),
        ("resident memory MB (all instances)", one["rss_mb_total"], three["rss_mb_total"]),
        ("start-up s", one["start_s"], three["start_s"]),
    ]
    report.table(
        "Side by side",
        ["", one["side"], three["side"], "3 / 1"],
        [[label, a, b, fmt_x(ratio(b, a))] for label, a, b in measures],
    )
    report.note(f"handoffs between instances: {three['handoffs']}")
    report.results["sides"] = rows
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
