"""Batching: how decode throughput scales with concurrent agents, what a long prefill does to a short
request, and what the engine adds to each decode step.

(a) Aggregate decode tokens/s with 1, 2, 4, 8, 16 agents at once (SEMANTIC_MLX_MAX_BATCH_SIZE=16),
    each with its own short prompt of the same length, temperature 0. All requests reach the engine
    in the same loop turn (submitted while a gate holds the engine between two steps), so they
    prefill together and join the decode batch on the same step; decode is measured from that first
    token to the end (GenerationResult.decode_seconds). The same batch sizes run through a bare loop
    of batched single-token forward passes (mlx-lm KV caches merged into its BatchKVCache, the same
    model object, no engine) on the engine's thread. Printed: speedup over batch 1 for both, and the
    engine's share of the bare scaling.
(b) Time to first token of a short request submitted while another agent prefills a long prompt
    (4K tokens, SEMANTIC_MLX_PREFILL_STEP_SIZE=512), in units of one prefill chunk, the chunk time
    taken from the long prompt's PrefillProgress events just before the short one arrived. Short
    requests arrive at several points inside a chunk.
(c) Engine time per decode step over the bare forward pass, at batch 1 and 8 (from (a)).
(d) Mixed history lengths: decode step time and peak MLX memory of one agent with a 2K-token history
    alone, of seven short agents alone, and of all eight decoding together.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import Report, fit_text, fmt, fmt_x, make_parser, median, progress, ratio


def counting_prompts(tokenizer: Any, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` tokens that a model continues for a long time
    (counting up from different numbers), so that no sequence ends early with an end-of-turn token."""
    out = []
    for i in range(count):
        start = 100 + seed % 1000 + 37 * i
        text = f"Counting up from {start}: " + ", ".join(str(n) for n in range(start, start + length))
        ids = list(tokenizer.encode(text, add_special_tokens=False))[:length]
        assert len(ids) == length
        out.append(ids)
    return out


def distinct_prompts(tokenizer: Any, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` different raw token sequences of exactly `length` tokens (no chat template)."""
    out = []
    for i in range(count):
        text = fit_text(tokenizer, seed + 31 * i, length + 8)
        ids = list(tokenizer.encode(text, add_special_tokens=False))[:length]
        assert len(ids) == length
        out.append(ids)
    return out


class Gate:
    """Holds the engine thread inside `engine.call` so several submissions land in one loop turn."""

    def __init__(self, engine: Any) -> None:
        self._inside = threading.Event()
        self._open = threading.Event()

        def hold() -> None:
            self._inside.set()
            self._open.wait()

        self._thread = threading.Thread(target=engine.call, args=(hold,), kwargs={"timeout": None}, daemon=True)

    def __enter__(self) -> Gate:
        self._thread.start()
        self._inside.wait()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._open.set()
        self._thread.join()


# (a) and (c) ------------------------------------------------------------------------------------------


def engine_decode(engine: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> dict[str, Any]:
    from semantic_core.engine.types import GenerationRequest

    with Gate(engine):
        handles = [
            engine.submit(GenerationRequest(tokens=p, max_tokens=max_tokens, temperature=0.0, agent_id=f"{tag}-{i}"))
            for i, p in enumerate(prompts)
        ]
    results = [h.wait() for h in handles]
    for r in results:
        engine.delete_agent(r.agent_id)
    ttfts = [r.time_to_first_token or 0.0 for r in results]
    steps, window = full_batch_window(results)
    return {
        "batch": len(prompts),
        "full_batch_steps": steps,
        "window_s": window,
        "tps": len(prompts) / (window / steps),
        "step_s": window / steps,
        "first_token_spread_s": max(ttfts) - min(ttfts),
        "stop_reasons": sorted({r.stop_reason for r in results}),
        "early_stops": sum(1 for r in results if r.stop_reason != "max_tokens"),
    }


def full_batch_window(results: list[Any]) -> tuple[int, float]:
    """(decode steps, seconds) while every sequence was in the batch.

    All sequences got their first token from the same step (they joined together), so the first one to
    finish bounds the stretch in which the batch was complete."""
    first_done = min(results, key=lambda r: r.usage.output_tokens)
    return max(first_done.usage.output_tokens - 1, 1), first_done.decode_seconds


def bare_decode(model: Any, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """Batched single-token decode steps with mlx-lm caches and nothing else (engine thread only)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    caches = []
    for p in prompts:
        c = make_prompt_cache(model)
        model(mx.array([p[:-1]]), cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    merged = [type(caches[0][i]).merge([c[i] for c in caches]) for i in range(len(caches[0]))]

    def step(y: mx.array) -> mx.array:
        return mx.argmax(model(y[:, None], cache=merged)[:, -1, :], axis=-1)

    # Pipelined as mlx-lm does: the next step is queued before the current tokens are read.
    nxt = step(mx.array([p[-1] for p in prompts]))
    mx.async_eval(nxt)
    stamps = []
    for _ in range(steps):
        cur = nxt
        nxt = step(cur)
        mx.async_eval(nxt)
        cur.tolist()
        stamps.append(time.perf_counter())
    mx.eval(nxt)
    window = stamps[-1] - stamps[0]
    n = len(prompts)
    return {
        "batch": n,
        "tokens_after_first": n * (steps - 1),
        "window_s": window,
        "tps": n * (steps - 1) / window,
        "step_s": window / (steps - 1),
    }


# (b) ------------------------------------------------------------------------------------------------------


def short_during_long(
    engine: Any, long_prompt: list[int], shorts: list[list[int]], phases: list[float]
) -> dict[str, Any]:
    from semantic_core.engine.types import Finished, GenerationRequest, PrefillProgress

    events: list[tuple[float, int]] = []
    cond = threading.Condition()
    finished: list[Any] = []

    long = engine.submit(GenerationRequest(tokens=long_prompt, max_tokens=1, temperature=0.0, agent_id="long"))

    def consume() -> None:
        for ev in long:
            with cond:
                if isinstance(ev, PrefillProgress):
                    events.append((time.monotonic(), ev.done))
                elif isinstance(ev, Finished):
                    finished.append(ev.result)
                cond.notify_all()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()

    def wait_events(n: int) -> bool:
        with cond:
            cond.wait_for(lambda: len(events) >= n or bool(finished))
            return len(events) >= n and not finished

    samples = []
    seen = 2
    for i, phase in enumerate(phases):
        if not wait_events(seen):
            break
        with cond:
            stamps = [t for t, _ in events[max(0, seen - 3) : seen]]
            t2 = stamps[-1]
        # The unit: the shorter of the last two chunks (a noise spike in one must not shrink the ratio).
        chunk = min(b - a for a, b in itertools.pairwise(stamps))
        time.sleep(max(0.0, phase * chunk - (time.monotonic() - t2)))
        if finished:
            break
        res = engine.complete(GenerationRequest(tokens=shorts[i], max_tokens=1, temperature=0.0, agent_id=f"short-{i}"))
        with cond:
            done_by_then = len(events)
        ttft = res.time_to_first_token or 0.0
        samples.append(
            {
                "phase": phase,
                "ttft_s": ttft,
                "chunk_s": chunk,
                "ttft_chunks": ttft / chunk,
                "long_chunks_done_when_short_done": done_by_then,
            }
        )
        engine.delete_agent(res.agent_id)
        seen = done_by_then + 1  # next short: one chunk later (its unit includes the last short's final step)
    consumer.join()
    engine.delete_agent("long")
    chunks = [b[0] - a[0] for a, b in itertools.pairwise(events)]
    return {
        "samples": samples,
        "progress_events": len(events),
        "chunk_s_all": chunks,
        "long_ttft_s": finished[0].time_to_first_token if finished else None,
    }


# (d) ------------------------------------------------------------------------------------------------------


def mixed_lengths(engine: Any, long_prompt: list[int], shorts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Decode step time and MLX memory: short agents alone, one long-history agent alone, and all together.

    The long agent is prefilled once; each later run continues its conversation (one token computed)."""
    import mlx.core as mx

    from semantic_core.engine.types import GenerationRequest

    first = engine.complete(GenerationRequest(tokens=long_prompt, max_tokens=1, temperature=0.0, agent_id="history"))
    history = [*long_prompt, *first.token_ids]

    def run(with_long: bool, with_shorts: bool, tag: str) -> dict[str, Any]:
        nonlocal history
        base = engine.call(
            lambda: (mx.synchronize(), mx.clear_cache(), mx.reset_peak_memory(), mx.get_active_memory())[-1]
        )
        reqs = []
        if with_long:
            reqs.append(GenerationRequest(tokens=history, max_tokens=max_tokens, temperature=0.0, agent_id="history"))
        if with_shorts:
            reqs += [
                GenerationRequest(tokens=p, max_tokens=max_tokens, temperature=0.0, agent_id=f"{tag}-{i}")
                for i, p in enumerate(shorts)
            ]
        with Gate(engine):
            handles = [engine.submit(r) for r in reqs]
        results = [h.wait() for h in handles]
        peak = engine.call(mx.get_peak_memory)
        for req, res in zip(reqs, results, strict=True):
            if req.agent_id == "history":
                history = [*req.tokens, *res.token_ids]
            else:
                engine.delete_agent(res.agent_id)
        steps, window = full_batch_window(results)
        return {
            "sequences": len(reqs),
            "step_s": window / steps,
            "peak_over_idle_bytes": peak - base,
            "contexts": [r.usage.prompt_tokens for r in results],
        }

    out = {
        "long alone": run(True, False, "d1"),
        "shorts alone": run(False, True, "d2"),
        "long + shorts": run(True, True, "d3"),
    }
    engine.delete_agent("history")
    out["history_tokens"] = len(history)
    return out


def main() -> None:
    parser = make_parser(
        "Decode scaling with concurrent agents (engine vs bare forward loop), a short request's "
        "TTFT during a long prefill, engine overhead per decode step, mixed history lengths.",
        epilog=__doc__,
    )
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 2 4 8 16; 1 2 4 with --quick)")
    parser.add_argument(
        "--max-tokens", type=int, help="generated tokens per agent in (a) (default 64; 16 with --quick)"
    )
    parser.add_argument("--reps", type=int, help="repetitions of (a), best kept (default 2; 1 with --quick)")
    parser.add_argument("--long-tokens", type=int, help="the long prompt of (b) (default 4096; 1024 with --quick)")
    args = parser.parse_args()

    from _common import model_facts

    import semantic_core  # noqa: F401  (chooses the BLAS before mlx is imported)
    from semantic_core.config import Settings
    from semantic_core.engine.engine import Engine
    from semantic_core.observability import configure_logging

    configure_logging("WARNING")
    report = Report("batch_scaling", "Batching: decode scaling, TTFT during a long prefill, step overhead", args.quick)
    batches = args.batches or ([1, 2, 4] if args.quick else [1, 2, 4, 8, 16])
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    reps = args.reps or (1 if args.quick else 2)
    long_tokens = args.long_tokens or (1024 if args.quick else 4096)
    chunk_tokens = 128 if args.quick else 512
    mixed_tokens = 512 if args.quick else 2048
    mixed_steps = 16 if args.quick else 32
    prompt_len = 30  # 16 x 29 prompt tokens fit one 512-token prefill turn: all join decode together
    phases = [0.1, 0.5, 0.9]

    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        settings = Settings(
            agent_cache_dir=Path(tmp),
            agent_save_on_finish=False,
            mlx_max_batch_size=16,
            mlx_prefill_step_size=chunk_tokens,
        )
        assert max(batches) * (prompt_len - 1) <= chunk_tokens or args.batches, "prompts must prefill in one turn"
        engine = Engine(settings).start()
        try:
            assert engine.info is not None
            info = engine.info
            prompts = counting_prompts(engine.tokenizer, max(batches), prompt_len, seed=4242)
            progress("warming up")
            engine_decode(engine, prompts[:2], 4, "warm")
            engine.call(lambda: bare_decode(engine.model, prompts[:2], 4))

            best: dict[str, dict[int, dict[str, Any]]] = {"engine": {}, "bare": {}}
            for rep in range(reps):
                for b in batches:
                    progress(f"(a) rep {rep + 1}/{reps}, batch {b}: engine, then the bare loop")
                    e = engine_decode(engine, prompts[:b], max_tokens, f"r{rep}-b{b}")
                    r = engine.call(lambda b=b: bare_decode(engine.model, prompts[:b], max_tokens), timeout=None)
                    for side, res in (("engine", e), ("bare", r)):
                        if b not in best[side] or res["step_s"] < best[side][b]["step_s"]:
                            best[side][b] = res

            progress(f"(b) a {long_tokens}-token prefill in {chunk_tokens}-token chunks, short requests arriving")
            long_prompt = distinct_prompts(engine.tokenizer, 1, long_tokens, seed=777)[0]
            shorts = distinct_prompts(engine.tokenizer, len(phases), prompt_len, seed=9000)
            interference = short_during_long(engine, long_prompt, shorts, phases)
            n_mixed = 7 if not args.quick else 3
            progress(f"(d) an agent with a {mixed_tokens}-token history and {n_mixed} short agents, alone and together")
            mixed = mixed_lengths(
                engine,
                long_prompt[:mixed_tokens],
                counting_prompts(engine.tokenizer, n_mixed, prompt_len, seed=6000),
                mixed_steps,
            )
        finally:
            engine.stop(save=False)

    # (a) scaling
    e1, r1 = best["engine"][batches[0]], best["bare"][batches[0]]
    rows, scaling = [], {}
    for b in batches:
        e, r = best["engine"][b], best["bare"][b]
        es, rs = ratio(e["tps"], e1["tps"]), ratio(r["tps"], r1["tps"])
        share = ratio(es, rs)
        rows.append(
            [
                str(b),
                fmt(e["tps"]),
                fmt(r["tps"]),
                fmt_x(es),
                fmt_x(rs),
                f"{fmt(share * 100)}%",
                fmt(e["step_s"] * 1000),
                fmt(r["step_s"] * 1000),
                f"{fmt((e['step_s'] / r['step_s'] - 1) * 100)}%",
                str(e["early_stops"]),
            ]
        )
        scaling[str(b)] = {
            "engine": e,
            "bare": r,
            "engine_speedup": es,
            "bare_speedup": rs,
            "share": share,
            "step_overhead": e["step_s"] / r["step_s"] - 1,
        }
    report.table(
        f"(a) aggregate decode tokens/s, {max_tokens} tokens per agent, prompts of {prompt_len} tokens, best of "
        f"{reps}; engine timed while the whole batch was decoding",
        [
            "batch",
            "engine tok/s",
            "bare tok/s",
            "engine speedup",
            "bare speedup",
            "engine share of bare scaling",
            "engine ms/step",
            "bare ms/step",
            "engine overhead/step",
            "early stops",
        ],
        rows,
    )
    top = str(batches[-1])
    if batches[-1] > 1:
        share = scaling[top]["share"]
        report.goal(f"(a) engine share of bare scaling at batch {top}", ">= 90%", f"{fmt(share * 100)}%", share >= 0.9)

    # (b) interference
    s_rows = [
        [fmt(s["phase"]), fmt(s["ttft_s"]), fmt(s["chunk_s"]), fmt(s["ttft_chunks"])] for s in interference["samples"]
    ]
    report.table(
        f"(b) short request ({prompt_len} tokens) during a {long_tokens}-token prefill, {chunk_tokens}-token chunks",
        ["arrival (fraction of a chunk)", "TTFT s", "chunk s", "TTFT in chunks"],
        s_rows,
    )
    worst = max((s["ttft_chunks"] for s in interference["samples"]), default=float("nan"))
    mean = median([s["ttft_chunks"] for s in interference["samples"]])
    report.goal(
        "(b) short TTFT during a long prefill",
        "< 2 chunks (worst arrival)",
        f"{fmt(worst)} chunks (median {fmt(mean)})",
        worst < 2 if interference["samples"] else None,
    )

    # (d) mixed lengths
    d_rows = []
    for name in ("shorts alone", "long alone", "long + shorts"):
        d = mixed[name]
        d_rows.append([name, str(d["sequences"]), fmt(d["step_s"] * 1000), fmt(d["peak_over_idle_bytes"] / 1e6)])
    sa, both = mixed["shorts alone"]["step_s"], mixed["long + shorts"]["step_s"]
    mem = {k: mixed[k]["peak_over_idle_bytes"] for k in ("long alone", "shorts alone", "long + shorts")}
    mem_ratio = ratio(mem["long + shorts"], mem["long alone"] + mem["shorts alone"])
    report.table(
        f"(d) mixed history lengths: one agent with {mixed['history_tokens']:,} tokens of history and short agents "
        f"({prompt_len} tokens), {mixed_steps} tokens each",
        ["decoding", "sequences", "ms/step", "peak MLX memory over idle, MB"],
        d_rows,
    )
    alone_sum = mixed["long alone"]["step_s"] + sa
    report.note(
        f"(d) with the long-history agent decoding too, a step took {fmt_x(ratio(both, sa))} as long as the "
        f"short agents' alone ({fmt_x(ratio(both, alone_sum))} the two groups' steps added up), and peak "
        f"memory was {fmt_x(mem_ratio)} that of the two groups alone. The engine decodes sequences whose "
        "cache lengths differ by more than 256 tokens and 2x in separate batches, because mlx-lm's "
        "BatchKVCache left-pads a batch to its longest sequence (each short agent would attend over, and "
        "hold memory for, the long history): about 1x on both counts means no padding."
    )

    n_short = mixed["shorts alone"]["sequences"]
    hist = mixed["history_tokens"]
    pool_mb = (hist + n_short * (prompt_len + mixed_steps)) * info.bytes_per_token / 1e6
    padded_mb = (n_short + 1) * (hist + mixed_steps) * info.bytes_per_token / 1e6
    report.note(
        f"(d) KV the block pool accounts for in that run: about {fmt(pool_mb)} MB; one batch padded to the "
        f"long history would hold about {fmt(padded_mb)} MB ({info.bytes_per_token:,} bytes per token)."
    )
    mixed_summary = {
        "short_step_slowdown": ratio(both, sa),
        "step_over_groups_added": ratio(both, alone_sum),
        "peak_memory_ratio": mem_ratio,
        "pool_accounted_mb": pool_mb,
        "padded_batch_mb": padded_mb,
    }

    # (c) overhead
    for b in (1, 8):
        if str(b) in scaling:
            over = scaling[str(b)]["step_overhead"]
            report.goal(f"(c) engine overhead per decode step, batch {b}", "< 5%", f"{fmt(over * 100)}%", over < 0.05)
    report.note(
        f"{info.weights}, BLAS {info.blas}. The bare loop samples with argmax; the engine runs mlx-lm's "
        "GenerationBatch (log-softmax, sampler, stop checks) plus its own bookkeeping, detokenizing and "
        "events."
    )
    if args.quick:
        report.note(
            f"--quick: {chunk_tokens}-token prefill chunks (512 in the full run) so the short prompt "
            "still meets several chunks."
        )
    report.results.update(
        {
            "batches": batches,
            "max_tokens": max_tokens,
            "reps": reps,
            "prompt_tokens": prompt_len,
            "scaling": scaling,
            "interference": interference,
            "chunk_tokens": chunk_tokens,
            "long_tokens": long_tokens,
            "mixed_lengths": mixed,
            "mixed_summary": mixed_summary,
            "model": model_facts(info),
        }
    )
    report.finish(args.json)


if __name__ == "__main__":
    main()
