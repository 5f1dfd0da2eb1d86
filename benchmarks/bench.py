"""``make bench``: rerun every figure of docs/benchmarks.md and docs/reliability.md on this
commit, one after another, and write each one's table stamped with the commit, the date, the
machine and the exact command.

    .venv/bin/python benchmarks/bench.py                 # everything, the docs' commands (~1-2 h)
    .venv/bin/python benchmarks/bench.py --quick         # the same scripts, small sizes (minutes)
    .venv/bin/python benchmarks/bench.py --only embed_batching,tracing_cost

Each figure is the script that prints it (each prints its figure beside its baseline, measured
in the same run): its output goes to ``<out>/<name>.md`` under a stamp, and ``<out>/index.md``
lists every figure with its status and time. The full run writes to docs/bench/ (what the docs
show); ``--quick`` to bench-out/quick/ (never the docs: its sizes are too small to quote). The
figures that ask a running edge (``stack``) share one ``ragline run`` started here, with the
handbook ingested; the others start what they measure themselves. Figures run one at a time:
on a small machine two at once would measure each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass(frozen=True)
class Figure:
    name: str
    doc: str  # where the figure is quoted: file and section
    full: tuple[str, ...]  # the script and its arguments, as the docs give them
    quick: tuple[str, ...] | None  # small sizes; None: not part of the quick run
    stack: str = ""  # asks an edge: the STACKS entry it runs against ({url}, {generate}, {out})
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 3600


# The edges figures ask: make run's defaults, and the load test's (dense retrieval, as the
# monolith it is compared with retrieves).
STACKS = {"default": {}, "dense": {"RAGLINE_API_SEARCH_MODE": "dense",
                                   "RAGLINE_API_BM25_THRESHOLD": "0"}}  # fmt: skip
SWEEP = ("-m", "loadtest", "sweep", "--url", "{url}", "--levels", "2,4,8,16,32", "-z", "60",
         "--ramp-up", "5", "--cooldown", "5", "--compare-monolith", "--monolith-instances", "3",
         "--compare-chatchat", "--out", "{out}/sweep")  # fmt: skip
QUICK_SWEEP = ("-m", "loadtest", "sweep", "--url", "{url}", "--levels", "2", "-z", "5",
               "--ramp-up", "1", "--cooldown", "1", "--out", "{out}/sweep")  # fmt: skip

FIGURES = (
    Figure("retrieval_quality", "benchmarks.md: Retrieval quality",
           ("benchmarks/retrieval_quality.py", "--url", "{url}"),
           ("benchmarks/retrieval_quality.py", "--url", "{url}"), stack="default"),
    Figure("followup_retrieval", "benchmarks.md: Follow-up questions",
           ("benchmarks/followup_retrieval.py", "--url", "{url}", "--generate", "{generate}"),
           ("benchmarks/followup_retrieval.py", "--url", "{url}"), stack="default"),
    Figure("loadtest_sweep", "benchmarks.md: Load test", SWEEP, QUICK_SWEEP, stack="dense",
           timeout_s=3 * 3600),
    Figure("retrieve_scale", "benchmarks.md: Retrieve at a million passages",
           ("benchmarks/retrieve_scale.py",),
           ("benchmarks/retrieve_scale.py", "--n", "5000", "--queries", "50", "--flat-queries",
            "10", "--clusters", "20", "--nlist", "32", "--nprobe", "4")),
    Figure("retrieve_scale_isotropic", "benchmarks.md: Retrieve at a million passages",
           ("benchmarks/retrieve_scale.py", "--data", "isotropic", "--ef-construction", "40",
            "--ef-search", "128,256"), None),
    Figure("retrieve_postgres", "benchmarks.md: Retrieve on PostgreSQL, sharded",
           ("benchmarks/retrieve_postgres.py",),
           ("benchmarks/retrieve_postgres.py", "--n", "2000", "--queries", "50", "--writes",
            "5")),
    Figure("embed_batching", "benchmarks.md: Embed micro-batching",
           ("benchmarks/embed_batching.py",),
           ("benchmarks/embed_batching.py", "--levels", "1", "8", "--seconds", "1")),
    Figure("answer_quality_handbook", "benchmarks.md: Answer quality",
           ("benchmarks/answer_quality.py", "--corpus", "handbook", "--split", "heldout",
            "--config", "default:top_k=4",
            "--config", "ext-dense-nofloor:answerer=extractive,mode=dense,score_threshold=0",
            "--config", "smollm2-gen:answerer=generate,score_threshold=0"),
           ("benchmarks/answer_quality.py", "--corpus", "handbook", "--split", "heldout",
            "--config", "default:top_k=4")),
    Figure("answer_quality_debian", "benchmarks.md: Answer quality",
           ("benchmarks/answer_quality.py", "--corpus", "debian", "--split", "all",
            "--config", "default:top_k=4",
            "--config", "ext-dense-nofloor:answerer=extractive,mode=dense,score_threshold=0",
            "--config", "smollm2-auto:answerer=auto,score_threshold=0"), None),
    Figure("tracing_cost", "benchmarks.md: Cost of tracing",
           ("benchmarks/tracing_cost.py", "--requests", "600", "--concurrency", "4",
            "--max-tokens", "16"),
           ("benchmarks/tracing_cost.py", "--requests", "8", "--concurrency", "2",
            "--max-tokens", "4")),
    Figure("tracing_cost_generate", "benchmarks.md: Cost of tracing",
           ("benchmarks/tracing_cost.py", "--requests", "60", "--concurrency", "4",
            "--max-tokens", "16", "--answerer", "generate"), None),
    Figure("edge_overhead", "benchmarks.md: The edge's own cost",
           ("benchmarks/edge_overhead.py", "--baseline", "3a2eefb", "--requests", "400",
            "--rounds", "5"), None),
    Figure("generate_concurrency", "benchmarks.md: Generation: continuous batching on CPU",
           ("benchmarks/generate_concurrency.py", "--levels", "1,4,16,64", "--max-tokens", "32"),
           ("benchmarks/generate_concurrency.py", "--levels", "1,2", "--max-tokens", "4",
            "--requests", "4")),
    Figure("decode_steps", "benchmarks.md: Generation: continuous batching on CPU",
           ("benchmarks/decode_steps.py", "--q4-0"),
           ("benchmarks/decode_steps.py", "--sizes", "1,2", "--steps", "4")),
    Figure("prefix_reuse", "benchmarks.md: Prefix cache",
           ("benchmarks/prefix_reuse.py",), None),
    Figure("prefill_chunks", "benchmarks.md: Prefix cache",
           ("benchmarks/prefill_chunks.py",),
           ("benchmarks/prefill_chunks.py", "--sizes", "64", "--runs", "1")),
    Figure("faults_kill", "reliability.md: Faults under load",
           ("benchmarks/faults.py", "--concurrency", "4", "--down-s", "5", "--max-tokens", "8"),
           None),
    Figure("faults_stop", "reliability.md: Faults under load",
           ("benchmarks/faults.py", "--signal", "STOP", "--concurrency", "4", "--down-s", "8",
            "--max-tokens", "8"), None),
    Figure("soak", "reliability.md: Soak and overload",
           ("benchmarks/soak.py", "--concurrency", "4", "--soak-s", "600", "--overload-s", "60"),
           ("benchmarks/soak.py", "--concurrency", "2", "--soak-s", "8", "--overload-s", "4",
            "--warmup-s", "2", "--sample-s", "2", "--max-tokens", "4")),
)  # fmt: skip


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal"))  # fmt: skip
        memory = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        memory = "unknown memory"
    return f"{os.cpu_count()} cores ({cpu}), {memory}, {platform.system()} {platform.machine()}"


def commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{sha} (uncommitted changes)" if dirty else sha


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """``ragline run`` on free ports with the handbook ingested, for the figures that ask an
    edge; stopped with SIGTERM (the launcher stops its children)."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.ports = {stage: free_port() for stage in ("api", "embed", "retrieve", "generate")}
        self.url = f"http://127.0.0.1:{self.ports['api']}"
        self.generate = f"127.0.0.1:{self.ports['generate']}"
        args = [PY, "-m", "cli", "run", "--data-dir", str(workdir / name)]
        for stage, port in self.ports.items():
            args += [f"--{stage}-port", str(port)]
        log_path = workdir / f"stack-{name}.log"
        self.log = log_path.open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAGLINE_")}
        env |= STACKS[name]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 600
        while "Ctrl-C stops every service" not in log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ragline run did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()


def run_figure(fig: Figure, quick: bool, stack: Stack | None, out: Path, stamp: dict) -> dict:
    argv = list(fig.quick if quick else fig.full)
    chatchat = (ROOT / ".venv-chatchat" / ".stamp").exists()
    if "--compare-chatchat" in argv and not chatchat:
        argv.remove("--compare-chatchat")  # its venv is `make chatchat`; the command says so
    if stack is not None:
        argv = [a.format(url=stack.url, generate=stack.generate, out=out) for a in argv]
    shown = " ".join(shlex.quote(a) for a in [".venv/bin/python", *argv])
    env = {**os.environ, **fig.env, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    try:
        done = subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=fig.timeout_s)  # fmt: skip
        # The figure is what the script prints; its log (stderr) only when it failed.
        output, status = done.stdout, "ok" if done.returncode == 0 else "failed"
        if done.returncode:
            status += f" (exit {done.returncode})"
            output += "\n" + done.stderr[-20000:]
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
        status = f"timed out after {fig.timeout_s:.0f} s"
    seconds = time.monotonic() - t0
    if fig.stack:
        extra = " ".join(f"{k}={v}" for k, v in STACKS[fig.stack].items())
        stack_note = f"`{extra + ' ' if extra else ''}ragline run` (handbook ingested)"
    else:
        stack_note = "the processes the script starts itself"
    body = [
        f"# {fig.name}{' (quick)' if quick else ''}",
        "",
        f"- quoted in: docs/{fig.doc}",
        f"- commit: {stamp['commit']}",
        f"- date: {stamp['date']}",
        f"- machine: {stamp['machine']}",
        f"- against: {stack_note}",
        f"- command: `{shown}`",
        f"- status: {status}, {seconds:.0f} s",
        "",
        "```text",
        output.rstrip(),
        "```",
        "",
    ]
    (out / f"{fig.name}.md").write_text("\n".join(body))
    return {"name": fig.name, "status": status, "seconds": seconds, "doc": fig.doc}


def _index_rows(out: Path) -> list[str]:
    """One row per figure with a table in ``out`` (this run's or an earlier one's)."""
    rows = []
    for fig in FIGURES:
        path = out / f"{fig.name}.md"
        if not path.exists():
            continue
        fields = dict(ln[2:].split(": ", 1) for ln in path.read_text().splitlines()
                      if ln.startswith("- ") and ": " in ln)  # fmt: skip
        rows.append(f"| [{fig.name}]({fig.name}.md) | docs/{fig.doc} | "
                    f"{fields.get('commit', '?')} | {fields.get('status', '?')} |")  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of minutes")
    ap.add_argument("--only", default="", help="comma-separated figure names")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the tables go (default docs/bench, or bench-out/quick)",
    )
    ap.add_argument("--list", action="store_true", help="print the figures and exit")
    ns = ap.parse_args()

    figures = [f for f in FIGURES if not ns.quick or f.quick is not None]
    if ns.only:
        wanted = set(ns.only.split(","))
        unknown = wanted - {f.name for f in FIGURES}
        if unknown:
            ap.error(f"unknown figure(s): {', '.join(sorted(unknown))} (--list names them)")
        figures = [f for f in figures if f.name in wanted]
    if ns.list:
        for f in FIGURES:
            print(f"{f.name:<28} {'quick+full' if f.quick else 'full only':<11} docs/{f.doc}")
        return 0
    out = ns.out or (ROOT / ("bench-out/quick" if ns.quick else "docs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"commit": commit(), "machine": machine(),
             "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="ragline-bench-") as tmp:
        stack = None
        try:
            for fig in sorted(figures, key=lambda f: f.stack or "~"):  # grouped by stack
                if stack is not None and stack.name != fig.stack:
                    stack.stop()  # nothing else runs beside a figure
                    stack = None
                if fig.stack and stack is None:
                    try:
                        stack = Stack(fig.stack, Path(tmp))
                    except RuntimeError as exc:
                        results.append({"name": fig.name, "status": f"no stack: {exc}"[:300],
                                        "seconds": 0.0, "doc": fig.doc})  # fmt: skip
                        continue
                print(f"[bench] {fig.name} ...", flush=True)
                results.append(run_figure(fig, ns.quick, stack if fig.stack else None, out,
                                          stamp))  # fmt: skip
                print(f"[bench] {fig.name}: {results[-1]['status']}, "
                      f"{results[-1]['seconds']:.0f} s", flush=True)  # fmt: skip
        finally:
            if stack is not None:
                stack.stop()
    index = [
        f"# Benchmark tables{' (quick run: sizes too small to quote)' if ns.quick else ''}",
        "",
        f"Written by `{'make bench-quick' if ns.quick else 'make bench'}` "
        "(`benchmarks/bench.py`): one file per figure, each stamped with its commit, date, "
        f"machine and exact command. Last run: {stamp['commit']}, {stamp['date']}, "
        f"{stamp['machine']}.",
        "",
        "| figure | quoted in | commit | status |",
        "|---|---|---|---|",
        *_index_rows(out),
        "",
    ]
    (out / "index.md").write_text("\n".join(index))
    failed = [r["name"] for r in results if r["status"] != "ok"]
    print(f"[bench] {len(results) - len(failed)}/{len(results)} figures ok; tables in {out}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if shutil.which("git") is None:
        print("git is needed to stamp the commit", file=sys.stderr)
    raise SystemExit(main())
