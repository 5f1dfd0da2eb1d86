"""The replicated-monolith baseline answers /chat like ragline, alone and behind nginx."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loadtest.monolith import MonolithCluster, render_nginx_conf, served
from tests.conftest import Pipeline

pytestmark = pytest.mark.slow

DOCS = {
    "expenses.md": (
        "# Expenses\n\nSubmit every expense claim in Spendwise within 30 days of the purchase. "
        "Claims need a photo of the receipt. Your manager approves claims within 5 working days."
    ),
    "security.md": (
        "# Passwords\n\nPasswords must be at least 14 characters long and are stored in "
        "Vaultkeeper. Turn on two-factor authentication for email and never reuse a password."
    ),
    "kitchen.md": (
        "# Kitchen\n\nThe office kitchen is cleaned every Friday afternoon. Label your food in "
        "the fridge with your name; unlabelled food is thrown away on Fridays."
    ),
}
QUESTIONS = {
    "How long do I have to submit an expense claim?": "expenses.md",
    "How long must my password be?": "security.md",
    "When is the kitchen cleaned?": "kitchen.md",
}
needs_nginx = pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()),
    reason="Debian's nginx is not installed (make nginx)",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("monolith-corpus")
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


def ask(url: str, query: str) -> httpx.Response:
    return httpx.post(f"{url}/chat", json={"query": query, "max_tokens": 8}, timeout=120)


@needs_nginx
def test_monolith_answers_like_ragline_and_nginx_balances_its_instances(
    corpus, base_env, tmp_path
) -> None:
    env = {**base_env, "RAGLINE_DATA_DIR": str(tmp_path / "data")}
    pipeline = Pipeline(env, tmp_path, "--max-tokens", "8")
    try:
        pipeline.ingest(DOCS)
        with MonolithCluster(instances=2, corpus=corpus, threads=1) as cluster:
            for question, source in QUESTIONS.items():
                ours = ask(pipeline.url, question)
                theirs = ask(cluster.url, question)
                assert ours.status_code == theirs.status_code == 200, theirs.text
                a, b = ours.json(), theirs.json()
                assert set(a) == set(b), "same response shape"
                assert set(a["timings_ms"]) == set(b["timings_ms"])
                # Same model, chunking and exact search: the same passages in the same order.
                assert [s["id"] for s in b["sources"]] == [s["id"] for s in a["sources"]]
                assert b["sources"][0]["metadata"] == a["sources"][0]["metadata"]
                assert b["sources"][0]["id"].startswith(source)
                assert b["answer"] and b["usage"]["completion_tokens"] <= 8

            # least_conn spreads concurrent requests over both instances.
            with ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(lambda q: ask(cluster.url, q), list(QUESTIONS) * 2))
            assert all(r.status_code == 200 for r in replies)
            assert all(n > 0 for n in served(cluster)), served(cluster)

            # An instance dies: nginx sends the next requests to the other one.
            cluster.kill_instance(0)
            for question in QUESTIONS:
                assert ask(cluster.url, question).status_code == 200

            bad = httpx.post(f"{cluster.url}/chat", json={"query": "  "}, timeout=30)
            assert bad.status_code == 400 and "query" in bad.json()["error"]["message"]
            bad = httpx.post(f"{cluster.url}/chat", json={"question": "x"}, timeout=30)
            assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("query")
    finally:
        pipeline.stop()


def test_nginx_conf_is_the_write_ups_least_conn_upstream(tmp_path) -> None:
    conf = render_nginx_conf(tmp_path, 8000, [9001, 9002, 9003], read_timeout=60)
    assert "least_conn;" in conf
    for port in (9001, 9002, 9003):
        assert f"server 127.0.0.1:{port} max_fails=3 fail_timeout=30s;" in conf
    assert "listen 127.0.0.1:8000;" in conf and "proxy_read_timeout 60s;" in conf
    assert f"pid {tmp_path}/nginx.pid;" in conf, "nothing written outside its directory"


def test_cluster_without_nginx_says_how_to_get_it(corpus) -> None:
    with pytest.raises(RuntimeError, match="make nginx"):
        MonolithCluster(instances=1, corpus=corpus, nginx="no-such-nginx-binary")
