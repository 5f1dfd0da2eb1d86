"""The OpenAPI schema is the contract: Schemathesis (every check, positive and negative
cases, stateful links) against a live edge over the real stack finds nothing. Answers are
extractive so the thousand-odd requests take a minute, not hours of generation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Pipeline

pytestmark = pytest.mark.slow


def test_schemathesis_finds_nothing(base_env, tmp_path_factory) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is in the test extra: make install-test"
    env = {**base_env, "RAGLINE_API_ANSWERER": "extractive",
           "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("contract-data"))}  # fmt: skip
    stack = Pipeline(env, tmp_path_factory.mktemp("contract-logs"))
    try:
        stack.ingest({"leave.md": "# Leave\n\nEveryone gets 27 days of paid leave a year."})
        done = subprocess.run(
            [cli, "run", f"{stack.url}/openapi.json", "--checks", "all", "--max-examples", "15",
             "--seed", "20261201", "--no-color"],
            cwd=tmp_path_factory.mktemp("contract-run"), capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
    finally:
        stack.stop()
    report = done.stdout + done.stderr
    assert done.returncode == 0 and "No issues found" in report, report[-6000:]
    assert " passed" in report and " 0 passed" not in report, "schemathesis ran no case"
