"""KV cache precision: what 8-bit and 4-bit KV buy (agents per GB, file size, resume time) and what
they cost (perplexity, greedy agreement, decode speed), per model, side by side in one run.

For each model and each SEMANTIC_MLX_KV_BITS setting (none / 8 / 4, group size --group):

- bytes per token in memory (the pool's accounting) and on disk (a saved 2K-token agent's file);
- agents of 1K tokens that a 512 MB budget holds (the block pool's own arithmetic);
- resident memory: a child process per setting holds N agents of 512 tokens hot and reports its RSS
  growth per agent (VmRSS, so MLX's real buffers, not the pool's accounting);
- resume-from-disk time to first token at 2K tokens: the agent saved and evicted, its file's pages
  dropped from the OS cache (posix_fadvise DONTNEED), then a new 32-token turn; best of 3;
- decode tokens/s at batch 1 and 8 (8 agents with different ~300-token prompts, 48 tokens each);
- quality: perplexity of benchmarks/data/heldout.txt (an original text, written after the models
  were trained) computed through the cache in 256-token chunks, as a conversation fills it; and
  greedy agreement with the unquantized cache on 5 prompts of 256 generated tokens: teacher-forced
  top-1 agreement (the quantized cache fed the reference tokens: the share of positions whose
  greedy choice is the same) and, free running, the position of the first different token.

    python benchmarks/kv_quant.py                       # SmolLM2 and Qwen2.5-Coder-0.5B
    python benchmarks/kv_quant.py --models smollm2-135m-instruct --quick
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, Report, default_model_dir, make_parser, progress, sentences

HELDOUT = BENCH_DIR / "data" / "heldout.txt"
PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper and a storm.",
    "Explain in detail how a compiler turns source code into machine code, step by step.",
    "Describe the water cycle thoroughly, with examples from rivers, oceans and clouds.",
    "Write a detailed guide to planting and caring for a vegetable garden through the year.",
    "Explain how the heart and the lungs work together, in depth, for a student.",
]


def load(alias: str, bits: str, group: int) -> Any:
    import semantic_core.model.blas  # noqa: F401  (chooses the CPU BLAS before MLX loads)
    from semantic_core.model import kv
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import resolve

    resolved = resolve(alias, default_model_dir(), quiet=True)
    return load_resolved(resolved, kv_format=kv.KVFormat.parse(bits, group))


# Quality -------------------------------------------------------------------------------------------


def perplexity(loaded: Any, tokens: list[int], chunk: int = 256) -> float:
    import mlx.core as mx

    from semantic_core.model import kv

    cache = kv.new_cache(loaded.model, loaded.info.kv_format)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, chunk):
        piece = tokens[start : start + chunk + 1]
        inputs, targets = piece[:-1], piece[1:]
        logits = loaded.model(mx.array([inputs]), cache=cache)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, mx.array(targets)[:, None], axis=-1)
        nll -= float(mx.sum(picked).item())
        count += len(targets)
        if len(piece) <= chunk:  # the last piece
            break
    return math.exp(nll / count)


def teacher_forced(loaded: Any, prompt: list[int], reference: list[int]) -> float:
    """Share of the reference's positions where this cache's greedy choice is the reference token."""
    import mlx.core as mx

    from semantic_core.model import kv

    cache = kv.new_cache(loaded.model, loaded.info.kv_format)
    seq = prompt + reference
    preds: list[int] = []
    for start in range(0, len(seq) - 1, 256):
        inputs = seq[start : min(start + 256, len(seq) - 1)]
        logits = loaded.model(mx.array([inputs]), cache=cache)[0]
        preds.extend(mx.argmax(logits, axis=-1).tolist())
    # preds[i] predicts seq[i + 1]; the reference starts at len(prompt).
    first = len(prompt) - 1
    same = sum(int(preds[first + i] == reference[i]) for i in range(len(reference)))
    return same / max(len(reference), 1)


# Engine measurements -------------------------------------------------------------------------------


def engine_for(loaded: Any, folder: Path, **overrides: Any) -> Any:
    from semantic_core.config import Settings
    from semantic_core.engine.engine import Engine

    values = {"agent_cache_dir": folder, "mlx_model_id": loaded.info.model_id, "agent_save_on_finish": False}
    values.update(overrides)
    return Engine(Settings(_env_file=None, **values), loaded=loaded).start()


def generate(engine: Any, prompts: list[list[int]], max_tokens: int, prefix: str) -> tuple[list[Any], float]:
    from semantic_core.engine.types import GenerationRequest

    t0 = time.perf_counter()
    handles = [
        engine.submit(GenerationRequest(tokens=p, max_tokens=max_tokens, temperature=0.0, agent_id=f"{prefix}{i}"))
        for i, p in enumerate(prompts)
    ]
    return [h.wait() for h in handles], time.perf_counter() - t0


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resume_ttft(engine: Any, history: list[int], new_turn: list[int], reps: int) -> tuple[float, int]:
    """Best TTFT of a new turn on an agent whose 2K-token cache comes from disk; and its file size."""
    from semantic_core.engine.types import GenerationRequest

    engine.complete(GenerationRequest(tokens=history, max_tokens=1, temperature=0.0, agent_id="resume"))
    best, size = float("inf"), 0
    for _ in range(reps):
        engine.save_agent("resume")
        engine.evict_agent("resume")
        path = engine.store.agents_dir / "resume.safetensors"
        size = path.stat().st_size
        drop_pages(path)
        r = engine.complete(
            GenerationRequest(tokens=history + new_turn, max_tokens=1, temperature=0.0, agent_id="resume")
        )
        best = min(best, r.time_to_first_token or float("inf"))
        # Rewind to the history (a prefix: one token computed) for the next repetition.
        engine.complete(GenerationRequest(tokens=history, max_tokens=1, temperature=0.0, agent_id="resume"))
    return best, size


def rss_child(alias: str, bits: str, group: int, agents: int, tokens: int) -> None:
    """In a fresh process: RSS growth per hot agent of `tokens` tokens (printed as JSON)."""
    loaded = load(alias, bits, group)  # first: semantic_core chooses the CPU BLAS before MLX loads

    import mlx.core as mx

    from semantic_core.engine.types import GenerationRequest

    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    with tempfile.TemporaryDirectory() as d:
        engine = engine_for(loaded, Path(d), mlx_cache_budget_mb=8192)
        engine.complete(GenerationRequest(tokens=[5, 6, 7], max_tokens=1, temperature=0.0, agent_id="warm"))
        engine.delete_agent("warm")
        mx.clear_cache()
        before = rss()
        for i in range(agents):
            text = sentences(1000 + i, 80)
            ids = loaded.tokenizer.encode(text)[:tokens]
            engine.complete(GenerationRequest(tokens=ids, max_tokens=1, temperature=0.0, agent_id=f"h{i}"))
        engine.call(mx.clear_cache)  # MLX's buffer cache holds freed temporaries, not agents
        after = rss()
        hot = sum(1 for a in engine.list_agents() if a.tier == "hot")
        engine.stop(save=False)
    print(json.dumps({"rss_per_agent": (after - before) / agents, "hot": hot}))


def measure_rss(alias: str, bits: str, group: int, agents: int, tokens: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", alias, bits, str(group), str(agents), str(tokens)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"RSS child failed: {out.stderr[-2000:]}")


# The run -------------------------------------------------------------------------------------------


RSS_AGENTS, RSS_TOKENS = 8, 512
QUICK_RSS_AGENTS, QUICK_RSS_TOKENS = 4, 256


def run_model(alias: str, formats: list[str], group: int, quick: bool) -> list[dict[str, Any]]:
    from semantic_core.engine.block_pool import BlockPool

    rows: list[dict[str, Any]] = []
    reference: list[list[int]] = []
    prompts: list[list[int]] = []
    n_gen = 64 if quick else 256
    for bits in formats:
        progress(f"{alias}: KV {bits}")
        loaded = load(alias, bits, group)
        info = loaded.info
        tok = loaded.tokenizer
        text_ids = tok.encode(HELDOUT.read_text())
        if quick:
            text_ids = text_ids[:600]
        row: dict[str, Any] = {"model": alias, "kv": bits, "format": info.kv_description}
        row["bytes_per_token"] = info.bytes_per_token
        pool = BlockPool.from_budget(512, 64, info.bytes_per_token)
        row["agents_1k_in_512mb"] = pool.capacity // math.ceil(1024 / 64)
        t0 = time.perf_counter()
        row["perplexity"] = perplexity(loaded, text_ids)
        row["heldout_tokens"] = len(text_ids)
        progress(f"  perplexity {row['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s)")
        with tempfile.TemporaryDirectory() as d:
            engine = engine_for(loaded, Path(d))
            try:
                if not prompts:
                    prompts = [list(engine.render([{"role": "user", "content": p}]).tokens) for p in PROMPTS]
                results, _ = generate(engine, prompts, n_gen, "g")
                generated = [list(r.token_ids) for r in results]
                if not reference:
                    reference = generated
                    row["first_difference"] = None
                    row["teacher_forced_agreement"] = 1.0
                else:
                    firsts = []
                    for ref, got in zip(reference, generated, strict=True):
                        n = min(len(ref), len(got))
                        diff = next((i for i in range(n) if ref[i] != got[i]), n)
                        firsts.append(diff)
                    row["first_difference"] = sorted(firsts)
                    row["teacher_forced_agreement"] = sum(
                        teacher_forced(loaded, p, ref) for p, ref in zip(prompts, reference, strict=True)
                    ) / len(prompts)
                row["reference_tokens"] = [len(r) for r in reference]
                progress(f"  agreement {row['teacher_forced_agreement']:.3f}, first diff {row['first_difference']}")
                history = tok.encode(sentences(77, 400))[: 512 if quick else 2048]
                new_turn = tok.encode(sentences(78, 10))[:32]
                row["resume_ttft_s"], size = resume_ttft(engine, history, new_turn, 1 if quick else 3)
                row["disk_bytes_per_token"] = size / (len(history) + 1)
                progress(f"  resume TTFT {row['resume_ttft_s'] * 1000:.0f} ms, file {size / 1e6:.1f} MB")
                batch_prompts = [tok.encode(sentences(300 + i, 40))[:300] for i in range(8)]
                single, _ = generate(engine, batch_prompts[:1], 48, "b1-")
                row["decode_tps_1"] = single[0].decode_tokens_per_second
                many, _ = generate(engine, batch_prompts, 48, "b8-")
                row["decode_tps_8"] = sum(r.usage.output_tokens for r in many) / max(r.decode_seconds for r in many)
                progress(f"  decode {row['decode_tps_1']:.1f} / {row['decode_tps_8']:.1f} tok/s")
            finally:
                engine.stop(save=False)
        del loaded, engine
        n_agents, n_tokens = (QUICK_RSS_AGENTS, QUICK_RSS_TOKENS) if quick else (RSS_AGENTS, RSS_TOKENS)
        rss = measure_rss(alias, bits, group, n_agents, n_tokens)
        row["rss_per_agent"] = rss["rss_per_agent"]
        row["rss_agent_tokens"] = n_tokens
        row["rss_agents"] = n_agents
        progress(f"  RSS per {n_tokens}-token agent {rss['rss_per_agent'] / 1e6:.1f} MB")
        rows.append(row)
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        alias, bits, group, agents, tokens = sys.argv[2:7]
        rss_child(alias, bits, int(group), int(agents), int(tokens))
        return 0
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--formats", default="none,8,4")
    parser.add_argument("--group", type=int, default=64)
    args = parser.parse_args()
    report = Report("kv_quant", "KV cache precision: memory, resume, speed and quality", args.quick)
    rows: list[dict[str, Any]] = []
    for alias in args.models.split(","):
        rows.extend(run_model(alias, args.formats.split(","), args.group, args.quick))
    base = {r["model"]: r for r in rows if r["kv"] == "none"}
    table = []
    for r in rows:
        b = base.get(r["model"], r)
        table.append(
            [
                r["model"].split("-")[0],
                r["format"],
                f"{r['bytes_per_token']:,}",
                f"{r['disk_bytes_per_token']:,.0f}",
                str(r["agents_1k_in_512mb"]),
                f"{r['rss_per_agent'] / 1e6:.1f}",
                f"{r['resume_ttft_s'] * 1000:.0f}",
                f"{r['decode_tps_1']:.1f} ({r['decode_tps_1'] / b['decode_tps_1']:.2f}x)",
                f"{r['decode_tps_8']:.1f} ({r['decode_tps_8'] / b['decode_tps_8']:.2f}x)",
                f"{r['perplexity']:.3f} ({(r['perplexity'] / b['perplexity'] - 1) * 100:+.1f}%)",
                f"{r['teacher_forced_agreement'] * 100:.1f}%",
                "-" if r["first_difference"] is None else ",".join(map(str, r["first_difference"])),
            ]
        )
    report.table(
        "KV precision (ratios against the unquantized cache of the same model, same run)",
        [
            "model",
            "KV",
            "B/token",
            "disk B/token",
            "1K agents in 512 MB",
            f"RSS MB / {QUICK_RSS_TOKENS if args.quick else RSS_TOKENS}-token agent",
            f"resume TTFT ms ({512 if args.quick else 2048} tokens, cold)",
            "decode tok/s b=1",
            "decode tok/s b=8",
            "perplexity",
            "greedy agreement",
            "first diff (5 prompts)",
        ],
        table,
    )
    report.results["rows"] = rows
    report.note(
        "perplexity: benchmarks/data/heldout.txt through the cache in 256-token chunks; greedy agreement: "
        "teacher-forced top-1 agreement with the unquantized cache's greedy answers (5 prompts); first diff: "
        "where each free-running greedy answer first differs from the unquantized one (its length if never)"
    )
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
