"""The Locust plan as shipped (loadtest/locustfile.py) runs headless for a few seconds against a
live stack and its requests succeed: the file a Locust user would start from works on this
commit, not only its shape (tests/unit/test_loadtest_plans.py). Bounded: 2 users, 5 s, loopback.

JMeter is not run: Debian bookworm's jmeter (2.13) cannot load any plan on its own libraries
(``ForbiddenClassException: org.apache.jmeter.save.ScriptWrapper``, from its newer xstream), so
loadtest/chat.jmx is checked for its shape only (docs/benchmarks.md says so)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, Pipeline

pytestmark = pytest.mark.slow


def test_the_locust_plan_runs_headless_and_its_requests_succeed(base_env, tmp_path) -> None:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    assert locust, "locust is in the test extra: make install-test"
    env = {**base_env, "RAGLINE_API_ANSWERER": "extractive",
           "RAGLINE_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    stack = Pipeline(env, tmp_path)
    try:
        pages = ("annual-leave.md", "expenses-and-reimbursement.md")
        stack.ingest({p: (REPO_ROOT / "corpus" / "handbook" / p).read_text() for p in pages})
        done = subprocess.run(
            [locust, "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--host", stack.url,
             "--headless", "-u", "2", "-r", "2", "-t", "5s", "--csv", str(tmp_path / "run"),
             "--only-summary", "--stop-timeout", "10"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**env, "RAGLINE_LOADTEST_QUESTIONS": str(REPO_ROOT / "corpus" / "questions.csv")},
        )  # fmt: skip
    finally:
        stack.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as fh:
        rows = {r["Name"]: r for r in csv.DictReader(fh)}
    chat = rows["POST /chat"]
    assert int(chat["Request Count"]) >= 2 and int(chat["Failure Count"]) == 0, chat
