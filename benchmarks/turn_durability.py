"""What it costs to make every answered turn durable before the answer completes.

When a turn ends, the engine writes the agent's record (the conversation with the new answer) to its
turn journal, atomically and fsync'd, and only then tells the caller the answer is complete; the KV
tensors are written afterwards on the writer thread. This script measures, on the default model, for
agents with about 256, 1K and 2K tokens of history:

- the wait per turn for the journal (`GenerationResult.durable_seconds`), in milliseconds and as a share
  of the whole turn (submission to completion);
- the time the full tensor save of the same agent takes (`engine.save_agent`), which is what holding the
  answer for the whole file would have cost instead;
- the journal's size against the tensor file's.

Each turn generates 16 tokens at temperature 0; saves after turns are on (as by default), so the journal
write competes with the previous turn's tensor write, as it does in service.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import Report, fmt, fmt_x, make_parser, median, progress, ratio, sentences


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    import semantic_core  # noqa: F401  (BLAS before MLX)
    from semantic_core.config import load_settings
    from semantic_core.engine.engine import Engine
    from semantic_core.engine.types import GenerationRequest
    from semantic_core.observability import configure_logging

    configure_logging("WARNING")
    report = Report("turn_durability", "Durable turns: the journal wait per answer vs a full tensor save", args.quick)
    sizes = [256, 1024] if args.quick else [256, 1024, 2048]
    turns = 3 if args.quick else 8
    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        settings = load_settings(agent_cache_dir=Path(tmp))
        engine = Engine(settings).start()
        try:
            for size in sizes:
                agent = f"durable-{size}"
                history: list[dict[str, str]] = []
                i = 0
                while len(engine.render(history).tokens if history else []) < size:
                    history += [
                        {"role": "user", "content": f"Question {i}: " + sentences(size + i, 3)},
                        {"role": "assistant", "content": sentences(size + 500 + i, 6)},
                    ]
                    i += 1
                waits, totals = [], []
                progress(f"{size} tokens of history: {turns} turns")
                for t in range(turns):
                    messages = [*history, {"role": "user", "content": f"Turn {t}: " + sentences(t, 1)}]
                    request = GenerationRequest(
                        tokens=engine.render(messages).tokens,
                        max_tokens=16,
                        temperature=0.0,
                        agent_id=agent,
                        messages=messages,
                    )
                    start = time.perf_counter()
                    result = engine.complete(request)
                    totals.append(time.perf_counter() - start)
                    waits.append(result.durable_seconds)
                    assert result.turn_saved
                saves = []
                for _ in range(3):
                    engine.rename_agent(agent, f"rename {len(saves)}")  # dirty, so the save really writes
                    start = time.perf_counter()
                    info = engine.save_agent(agent)
                    saves.append(time.perf_counter() - start)
                journal = Path(tmp) / "agents" / f"{agent}.turn.json"
                record_bytes = len(engine.store.get(agent).record.to_json().__repr__())
                wait, total, save = median(waits), median(totals), min(saves)
                rows.append(
                    [
                        f"{info.tokens:,}",
                        fmt(wait * 1000),
                        fmt(100 * wait / total, 2),
                        fmt(total * 1000),
                        fmt(save * 1000),
                        fmt_x(ratio(save, wait)),
                        fmt(info.disk_bytes / 1e6),
                        fmt(record_bytes / 1e3),
                    ]
                )
                summary[str(size)] = {
                    "tokens": info.tokens,
                    "journal_wait_ms": wait * 1000,
                    "turn_ms": total * 1000,
                    "share_of_turn": wait / total,
                    "tensor_save_ms": save * 1000,
                    "file_mb": info.disk_bytes / 1e6,
                    "record_kb": record_bytes / 1e3,
                    "journal_left": journal.exists(),
                }
        finally:
            engine.stop(save=False)
    report.table(
        f"Per turn, median of {turns} turns (16 tokens each); tensor save: best of 3",
        [
            "cached tokens",
            "journal wait ms",
            "% of the turn",
            "turn ms",
            "full tensor save ms",
            "tensor save / journal",
            "tensor file MB",
            "record KB",
        ],
        rows,
    )
    report.note(
        "The journal wait is what every answer pays for durability; holding it for the tensor save instead "
        "would cost the 'full tensor save' column, and grow with the history."
    )
    report.results.update({"summary": summary, "turns": turns})
    report.finish(args.json)


if __name__ == "__main__":
    main()
