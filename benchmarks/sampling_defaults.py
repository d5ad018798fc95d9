"""Which sampling to use when a client gives none: scored on short factual and instruction prompts.

The prompt set (benchmarks/data/sampling_prompts.json) holds 20 short questions and instructions,
each with the patterns a right answer contains. Every setting below answers all of them through the
engine (temperature-0 settings once; sampled settings with several seeds), and each answer is scored:

- right: one of the answer's patterns is present (case-insensitive regular expressions);
- degenerate: the answer loops (a word 4-gram that occurs 3 or more times, or the same line twice or
  more) or runs to max_tokens without ending its turn.

Settings: greedy; greedy with mlx-lm's repetition penalty (1.1 over the last 64 tokens); the model's
own generation defaults (its generation_config.json, when it has one); min_p 0.1 at temperature 0.7;
temperature 0.2 with top_p 0.9 (the TUI's fixed choice before the policy); and temperature 1.0 (what an API
client that sends no temperature got before it).
The best setting (most right, then fewest degenerate answers) is the one to make the default.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, Report, fmt, make_parser, progress

PROMPTS = BENCH_DIR / "data" / "sampling_prompts.json"


def degenerate(text: str, stop_reason: str) -> bool:
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    lines = Counter(line.strip().lower() for line in text.splitlines() if line.strip())
    return (
        stop_reason == "max_tokens"
        or any(n >= 3 for n in grams.values())
        or any(n >= 2 and len(line) > 8 for line, n in lines.items())
    )


def right(text: str, patterns: list[str]) -> bool:
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def settings_for(info: Any) -> list[tuple[str, dict[str, Any], int]]:
    """(name, sampling fields, seeds)."""
    out: list[tuple[str, dict[str, Any], int]] = [
        ("greedy", {"temperature": 0.0}, 1),
        ("greedy + repetition penalty 1.1", {"temperature": 0.0, "repetition_penalty": 1.1}, 1),
    ]
    own = dict(info.generation_defaults)
    if own:
        label = ", ".join(f"{k} {v:g}" for k, v in sorted(own.items()))
        out.append((f"the model's own ({label})", own, 2 if own.get("temperature", 1.0) > 0 else 1))
    out += [
        ("temperature 0.2, top_p 0.9 (the TUI's before)", {"temperature": 0.2, "top_p": 0.9}, 2),
        ("min_p 0.1, temperature 0.7", {"temperature": 0.7, "min_p": 0.1}, 2),
        ("temperature 1.0 (the API's before)", {"temperature": 1.0}, 2),
    ]
    return out


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SEMANTIC_MLX_MODEL_ID to measure (default: the default model)")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    import mlx.core as mx

    import semantic_core  # noqa: F401  (BLAS before MLX)
    from semantic_core.config import load_settings
    from semantic_core.engine.engine import Engine
    from semantic_core.engine.types import GenerationRequest
    from semantic_core.observability import configure_logging

    configure_logging("WARNING")
    cases = json.loads(PROMPTS.read_text())["prompts"]
    if args.quick:
        cases = cases[:6]
    report = Report("sampling_defaults", "Sampling defaults: right and degenerate answers per setting", args.quick)
    overrides: dict[str, Any] = {"mlx_max_batch_size": 8}
    if args.model:
        overrides["mlx_model_id"] = args.model
    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        settings = load_settings(agent_cache_dir=Path(tmp), **overrides)
        engine = Engine(settings).start()
        try:
            info = engine.info
            assert info is not None
            examples: dict[str, list[str]] = {}
            for name, fields, seeds in settings_for(info):
                n_right = n_degenerate = total = 0
                for seed in range(seeds if not args.quick else 1):
                    mx.random.seed(1000 + seed)
                    progress(f"{name}: seed {seed}")
                    handles = []
                    for case in cases:
                        messages = [{"role": "user", "content": case["prompt"]}]
                        request = GenerationRequest(
                            tokens=engine.render(messages).tokens,
                            max_tokens=args.max_tokens,
                            temperature=float(fields.get("temperature", 0.0)),
                            top_p=float(fields.get("top_p", 1.0)),
                            top_k=int(fields.get("top_k", 0)),
                            min_p=float(fields.get("min_p", 0.0)),
                            repetition_penalty=fields.get("repetition_penalty"),
                        )
                        handles.append((case, engine.submit(request)))
                    for case, handle in handles:
                        result = handle.wait()
                        ok, bad = right(result.text, case["answers"]), degenerate(result.text, result.stop_reason)
                        n_right += ok
                        n_degenerate += bad
                        total += 1
                        if seed == 0 and case is cases[0]:
                            examples[name] = [result.text.strip()[:120]]
                rows.append(
                    [
                        name,
                        f"{n_right}/{total}",
                        fmt(100 * n_right / total, 3),
                        f"{n_degenerate}/{total}",
                        fmt(100 * n_degenerate / total, 3),
                    ]
                )
                summary[name] = {
                    "fields": fields,
                    "right": n_right,
                    "degenerate": n_degenerate,
                    "answers": total,
                    "right_share": n_right / total,
                    "degenerate_share": n_degenerate / total,
                }
        finally:
            engine.stop(save=False)
    report.table(
        f"{len(cases)} prompts, max_tokens {args.max_tokens}; sampled settings over several seeds "
        f"(model: {info.model_id})",
        ["setting", "right", "right %", "degenerate", "degenerate %"],
        rows,
    )
    best = max(summary, key=lambda k: (summary[k]["right_share"], -summary[k]["degenerate_share"]))
    report.note(f"best: {best}")
    for name, texts in examples.items():
        report.note(f"{name}: first prompt's answer: {texts[0]!r}")
    report.results.update({"summary": summary, "best": best, "model": info.model_id})
    report.finish(args.json)


if __name__ == "__main__":
    main()
