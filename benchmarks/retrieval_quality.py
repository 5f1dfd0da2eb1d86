"""Retrieval quality and per-stage latency of a running ragline on the sample handbook.

Asks every question of corpus/questions.csv through POST /chat (one at a time), and prints:
hit@1 and hit@k (the expected page is the top source / among the sources) side by side with a
lexical baseline (word-overlap ranking of the same chunks, no model), and the mean and P95 of
each stage's time. Needs a stack with the handbook ingested (`make run`).

    .venv/bin/python benchmarks/retrieval_quality.py --url http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import time
from pathlib import Path

import httpx

from ragline.chunking import chunk_text

ROOT = Path(__file__).resolve().parent.parent
WORD = re.compile(r"[a-z0-9]+")


def lexical_rank(question: str, chunks: list[tuple[str, str]], k: int) -> list[str]:
    """Sources of the k chunks sharing the most distinct words with the question."""
    q = set(WORD.findall(question.lower()))
    scored = sorted(chunks, key=lambda c: -len(q & set(WORD.findall(c[1].lower()))))
    return [source for source, _ in scored[:k]]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--questions", type=Path, default=ROOT / "corpus" / "questions.csv")
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpus" / "handbook")
    ap.add_argument("--top-k", type=int, default=4)
    ns = ap.parse_args()

    rows = list(csv.DictReader(ns.questions.open()))
    chunks = [
        (page.name, c.text)
        for page in sorted(ns.corpus.glob("*.md"))
        for c in chunk_text(page.read_text())
    ]
    stages: dict[str, list[float]] = {"embed": [], "retrieve": [], "generate": [], "total": []}
    hits1 = hitsk = lex1 = lexk = 0
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as client:
        for row in rows:
            r = client.post(f"{ns.url}/chat", json={"query": row["question"], "top_k": ns.top_k})
            r.raise_for_status()
            body = r.json()
            sources = [s["metadata"]["source"] for s in body["sources"]]
            hits1 += sources[:1] == [row["expected_source"]]
            hitsk += row["expected_source"] in sources
            lexical = lexical_rank(row["question"], chunks, ns.top_k)
            lex1 += lexical[:1] == [row["expected_source"]]
            lexk += row["expected_source"] in lexical
            for stage, ms in body["timings_ms"].items():
                stages.setdefault(stage, []).append(ms)  # extract: the extractive answerer
    n = len(rows)
    print(f"{n} questions in {time.monotonic() - t0:.1f}s against {ns.url}\n")
    print(f"{'':<12}{'ragline':>10}{'lexical':>10}{'ratio':>8}")
    for name, ours, base in (("hit@1", hits1, lex1), (f"hit@{ns.top_k}", hitsk, lexk)):
        ratio = f"{ours / base:.2f}" if base else "inf"
        print(f"{name:<12}{ours / n:>10.2f}{base / n:>10.2f}{ratio:>8}")
    print(f"\n{'stage':<12}{'mean ms':>10}{'p95 ms':>10}")
    for stage, values in stages.items():
        if not values:
            continue  # generate, when the answerer quotes instead
        print(f"{stage:<12}{statistics.fmean(values):>10.1f}{p95(values):>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
