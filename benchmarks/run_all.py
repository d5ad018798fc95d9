"""Run every benchmark script, one after the other, and collect the results.

Each script runs in its own process (`python benchmarks/<name>.py --json ...`, plus `--quick` when
given), its summary printed as it goes. Their JSON is combined into `results/latest.json` and a
Markdown report `results/latest.md`: the date, the machine, the model and the BLAS, every goal with
its verdict, then each benchmark's tables. A `--quick` run writes `results/latest-quick.*` instead,
so a smoke run never replaces the numbers of a full one.

`multi_agent_vs_servers.py` (a comparison with other servers) runs only with `--with-servers`, and
only when the file exists; like the others it is called with `--json PATH` (and `--quick`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, machine, make_parser

SCRIPTS = [
    "blas_choice",
    "cpu_ops",
    "engine_speed",
    "resume_ttft",
    "batch_scaling",
    "kv_quant",
    "http_overhead",
    "soak",
]
SERVERS_SCRIPT = "multi_agent_vs_servers"


def run_script(name: str, quick: bool, json_path: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--json", str(json_path)]
    if quick:
        cmd.append("--quick")
    print(f"\n######## {name}{' --quick' if quick else ''}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, check=False)
        code: int | None = proc.returncode
        error = None if code == 0 else f"exited with status {code}"
    except subprocess.TimeoutExpired:
        code, error = None, f"did not finish in {timeout:.0f} s"
    seconds = time.perf_counter() - start
    entry: dict[str, Any] = {"script": f"{name}.py", "exit_code": code, "seconds": round(seconds, 1)}
    if error is None and json_path.exists():
        entry["data"] = json.loads(json_path.read_text())
    else:
        entry["error"] = error or "wrote no JSON"
        print(f"######## {name}: FAILED ({entry['error']})", flush=True)
    return entry


def wait_for_quiet(seconds: float, threshold: float) -> None:
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    load = os.getloadavg()[0]
    if load >= threshold:
        print(f"note: load average still {load:.2f} after waiting {seconds:.0f} s; running anyway", file=sys.stderr)


def environment_facts(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Model and BLAS as the benchmarks reported them (else as this process would choose the BLAS)."""
    model = None
    for entry in entries.values():
        results = entry.get("data", {}).get("results", {})
        model = results.get("model") or results.get("ours_model")
        if model:
            break
    try:
        import semantic_core  # noqa: F401  (loads the BLAS; does not import mlx)
        from semantic_core.model.blas import blas_info

        blas = str(blas_info())
    except Exception as exc:  # the report must still be written
        blas = f"unknown ({exc})"
    if model and model.get("blas"):
        blas = model["blas"]
    return {"model": model, "blas": blas}


# Markdown ------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _numeric(cell: Any) -> bool:
    text = str(cell).strip()
    return bool(text) and (text[0].isdigit() or text[0] in "-+.") and text != "-"


def md_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    """Columns whose cells are mostly numbers are right-aligned."""
    align = []
    for i in range(len(columns)):
        cells = [row[i] for row in rows if i < len(row)]
        align.append("---:" if cells and sum(_numeric(c) for c in cells) * 2 > len(cells) else "---")
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "**missed**")


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    model = report.get("model") or {}
    out = ["# Benchmark results", ""]
    out.append(
        f"- Date: {report['date']}" + (" (quick smoke run: small sizes, not for comparison)" if report["quick"] else "")
    )
    out.append(
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; Python {m['python']}, "
        f"MLX {m['mlx']}, mlx-lm {m['mlx_lm']}"
    )
    out.append(
        f"- Load average when the run started: {m['load_average_at_start']} (the machine may be shared; "
        "every ratio below is measured side by side in one run)"
    )
    if model:
        out.append(
            f"- Model: {model.get('model_id')} ({model.get('model_type')}, {model.get('parameters', 0):,} "
            f"parameters), served as {model.get('weights')} on {model.get('device')}; KV cache "
            f"{model.get('kv_dtype')}, {model.get('kv_bytes_per_token', 0):,} bytes per token"
        )
    out.append(f"- BLAS: {report['blas']}")
    out.append(f"- Total time: {report['seconds']:.0f} s")
    out.append("")

    goals = []
    for name, entry in report["benchmarks"].items():
        for g in entry.get("data", {}).get("goals", []):
            goals.append([name, g["name"], g["target"], g["value"], verdict(g["met"])])
    if goals:
        out += ["## Goals", "", *md_table(["benchmark", "goal", "target", "measured", "verdict"], goals), ""]

    for name, entry in report["benchmarks"].items():
        data = entry.get("data")
        title = data.get("title", name) if data else name
        out += [f"## {title}", "", f"`benchmarks/{entry['script']}`, {entry['seconds']:.0f} s.", ""]
        if data is None:
            out += [f"Failed: {entry.get('error')}.", ""]
            continue
        tables = data.get("tables")
        if isinstance(tables, list) and tables:
            for t in tables:
                out += [f"**{t['title']}**", "", *md_table(t["columns"], t["rows"]), ""]
        else:  # a script with another JSON layout: show its top level as it is
            out += [
                "```json",
                json.dumps({k: v for k, v in data.items() if k != "machine"}, indent=2)[:6000],
                "```",
                "",
            ]
        for note in data.get("notes", []):
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    parser = make_parser("Run every benchmark and write results/latest.json and results/latest.md.", epilog=__doc__)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*SCRIPTS, SERVERS_SCRIPT],
        metavar="NAME",
        help=f"run only these ({', '.join(SCRIPTS)})",
    )
    parser.add_argument(
        "--with-servers",
        action="store_true",
        help=f"also run {SERVERS_SCRIPT}.py (when it exists): a comparison with other servers",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="where latest.json and latest.md go (default: benchmarks/results)",
    )
    parser.add_argument("--timeout", type=float, help="seconds allowed per script (default 900; 300 with --quick)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each script, wait up to SECONDS for the 1-minute load average to fall below "
        "--quiet-load (a shared machine); default 0: do not wait",
    )
    parser.add_argument("--quiet-load", type=float, default=0.5, help="load average counted as quiet (default 0.5)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other scripts' results of the existing report and replace only those run now",
    )
    args = parser.parse_args()
    # --json is accepted for symmetry with the scripts: the combined report is also written there.

    names = list(args.only or SCRIPTS)
    if args.with_servers and SERVERS_SCRIPT not in names:
        if (BENCH_DIR / f"{SERVERS_SCRIPT}.py").exists():
            names.append(SERVERS_SCRIPT)
        else:
            print(f"note: {SERVERS_SCRIPT}.py does not exist yet; skipped", file=sys.stderr)
    timeout = args.timeout or (300.0 if args.quick else 900.0)

    start = time.perf_counter()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    facts = machine()
    entries: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        for name in names:
            if args.quiet_wait:
                wait_for_quiet(args.quiet_wait, args.quiet_load)
            entries[name] = run_script(name, args.quick, Path(tmp) / f"{name}.json", timeout)

    stem = "latest-quick" if args.quick else "latest"
    seconds = round(time.perf_counter() - start, 1)
    previous = args.results_dir / f"{stem}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        merged = {n: e for n, e in old.get("benchmarks", {}).items() if n not in entries}
        merged.update(entries)
        order = [*SCRIPTS, SERVERS_SCRIPT]
        entries = dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        started, seconds = old.get("date", started), round(old.get("seconds", 0) + seconds, 1)
    report = {
        "date": started,
        "quick": args.quick,
        "machine": facts,
        **environment_facts(entries),
        "seconds": seconds,
        "benchmarks": entries,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_text = json.dumps(report, indent=2) + "\n"
    (args.results_dir / f"{stem}.json").write_text(json_text)
    (args.results_dir / f"{stem}.md").write_text(render_markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json_text)
    failed = [n for n, e in entries.items() if "error" in e]
    print(
        f"\nwrote {args.results_dir / (stem + '.json')} and {stem}.md"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
