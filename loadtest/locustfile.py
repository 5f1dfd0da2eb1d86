"""The /chat plan for Locust users: `locust -f loadtest/locustfile.py --host http://127.0.0.1:8080`.

The same plan as `loadtest http` and `loadtest/chat.jmx`: each simulated user posts one
question at a time from a CSV (shared, in order, recycled), with `Cache-Control: no-cache` so
the answer cache does not answer a replayed question. 429 (shed by the edge) is reported as its
own failure name, so Locust's table separates it from real errors (5xx, timeouts).

Headless, like the write-up's JMeter run (50 users, 60 s ramp-up, 5 minutes):

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --headless \\
        -u 50 -r 0.83 -t 5m --csv chat

Settings by environment: RAGLINE_LOADTEST_QUESTIONS (CSV path, default
corpus/load_questions.csv: hundreds of questions over every handbook page, so a 5-minute run does
not just replay the 40 of corpus/questions.csv),
RAGLINE_LOADTEST_MAX_TOKENS (adds max_tokens to the body), RAGLINE_LOADTEST_API_KEY,
RAGLINE_LOADTEST_TIMEOUT_S (default 60). Locust is not a ragline dependency:
`pip install locust`.
"""

from __future__ import annotations

import csv
import itertools
import os
from pathlib import Path

from locust import HttpUser, constant, task

QUESTIONS_CSV = Path(
    os.environ.get(
        "RAGLINE_LOADTEST_QUESTIONS",
        Path(__file__).resolve().parent.parent / "corpus" / "load_questions.csv",
    )
)


def load_questions(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    column = rows[0].index("question") if rows and "question" in rows[0] else None
    if column is None:
        return [r[0] for r in rows if r and r[0].strip()]
    return [r[column] for r in rows[1:] if len(r) > column and r[column].strip()]


QUESTIONS = itertools.cycle(load_questions(QUESTIONS_CSV))  # shared by every user, in order
MAX_TOKENS = os.environ.get("RAGLINE_LOADTEST_MAX_TOKENS")
API_KEY = os.environ.get("RAGLINE_LOADTEST_API_KEY")
TIMEOUT_S = float(os.environ.get("RAGLINE_LOADTEST_TIMEOUT_S", "60"))


class ChatUser(HttpUser):
    wait_time = constant(0)  # JMeter's thread group loops with no think time

    def on_start(self) -> None:
        self.client.headers.update({"Cache-Control": "no-cache"})
        if API_KEY:
            self.client.headers.update({"Authorization": f"Bearer {API_KEY}"})

    @task
    def chat(self) -> None:
        body: dict[str, object] = {"query": next(QUESTIONS)}
        if MAX_TOKENS:
            body["max_tokens"] = int(MAX_TOKENS)
        with self.client.post(
            "/chat", json=body, timeout=TIMEOUT_S, catch_response=True, name="POST /chat"
        ) as resp:
            if resp.status_code == 429:
                resp.failure("shed (429)")
            elif resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            elif not resp.json().get("answer"):
                resp.failure("empty answer")
            else:
                resp.success()
