"""``make bench-quick`` runs: every figure's script with small sizes, one after another, each
table written and stamped. A smoke test of the benchmark runner and of the scripts' current
interfaces (a script that no longer runs on this commit fails here); it asserts no timing."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_quick_bench_runs_every_figure_and_stamps_its_table(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    listed = subprocess.run([sys.executable, "benchmarks/bench.py", "--list"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    quick = [ln.split()[0] for ln in listed.splitlines() if "quick+full" in ln]
    assert len(quick) >= 8
    index = (tmp_path / "index.md").read_text()
    for name in quick:
        table = (tmp_path / f"{name}.md").read_text()
        for stamp in ("commit", "date", "machine", "command", "status"):
            assert re.search(rf"^- {stamp}: \S", table, re.M), (name, stamp)
        assert "- status: ok" in table and "```text\n" in table, table[-2000:]
        assert f"[{name}]({name}.md)" in index
    assert "cores" in index
