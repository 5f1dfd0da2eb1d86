"""Follow-up questions: retrieval hit@1 with and without condensing them, on a running ragline.

Every row of corpus/followups.csv is a first question, the assistant's answer to it, and a
follow-up that depends on it ("And the partner?") or changes the subject (``topic_switch``).
The follow-up is searched four ways, and the page of the best passage is compared with the
expected one:
- ``alone``: the follow-up as sent, no history (what ragline did before condensation);
- ``condensed``: ragline's own, ``POST /search`` with the history (``condense: history``: the
  follow-up is searched alone and together with the earlier user turns, the better-scoring
  search wins);
- ``concat``: always the earlier question and the follow-up as one text;
- ``llm``: the follow-up rewritten into a standalone question by the generate stage's LLM
  (a condensation prompt of the kind Langchain's ConversationalRetrievalChain uses), then
  searched alone. Needs ``--generate`` (the generate stage's address); skipped without it.

Prints hit@1 per method, split (tune / heldout) and kind, with ``alone`` as the baseline and
each method's ratio to it, and the mean time one LLM rewrite took.

    .venv/bin/python benchmarks/followup_retrieval.py --url http://127.0.0.1:8080 \\
        --generate 127.0.0.1:50053
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
REWRITE = (
    "Rewrite the user's last question so that it can be understood without the conversation. "
    "Keep its meaning; add the topic from the conversation only if the question refers to it. "
    "Answer with the rewritten question only."
)


def rewrite_messages(row: dict[str, str]) -> list[dict[str, str]]:
    turn = (
        f"Conversation:\nUser: {row['first']}\nAssistant: {row['answer']}\n\n"
        f"Last question: {row['followup']}\n\nRewritten question:"
    )
    return [{"role": "system", "content": REWRITE}, {"role": "user", "content": turn}]


async def llm_rewrites(address: str, rows: list[dict[str, str]]) -> tuple[list[str], float]:
    """The LLM's standalone question per row (its first line; the follow-up when empty), and
    the mean seconds per rewrite."""
    from ragline.balancer import PoolPolicy
    from ragline.clients import GenerateStageClient
    from ragline.types import SamplingParams

    generate = GenerateStageClient.connect(address, PoolPolicy(3, 30.0, 2.0))
    generate.pool.start()
    params = SamplingParams(max_tokens=48, temperature=0.0, seed=0)
    out, spent = [], 0.0
    try:
        for row in rows:
            t0 = time.perf_counter()
            done = await generate.generate(rewrite_messages(row), params, timeout=120)
            spent += time.perf_counter() - t0
            lines = done.text.strip().splitlines()
            out.append(lines[0].strip() if lines and lines[0].strip() else row["followup"])
    finally:
        await generate.pool.close()
    return out, spent / max(len(rows), 1)


def top_source(client: httpx.Client, url: str, query: str, history: list | None = None) -> str:
    body = {"query": query, "top_k": 4, "score_threshold": 0}
    if history is not None:
        body |= {"history": history, "condense": "history"}
    r = client.post(f"{url}/search", json=body)
    r.raise_for_status()
    passages = r.json()["passages"]
    return passages[0]["id"].rpartition("#")[0] if passages else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--generate", default="", help="generate stage host:port for the llm method")
    ap.add_argument("--questions", type=Path, default=ROOT / "corpus" / "followups.csv")
    ns = ap.parse_args()

    rows = list(csv.DictReader(ns.questions.open()))
    rewrites, per_rewrite = (None, 0.0)
    if ns.generate:
        rewrites, per_rewrite = asyncio.run(llm_rewrites(ns.generate, rows))
    hits: dict[str, dict[tuple[str, str], list[bool]]] = defaultdict(lambda: defaultdict(list))
    with httpx.Client(timeout=60) as client:
        for i, row in enumerate(rows):
            history = [{"role": "user", "content": row["first"]},
                       {"role": "assistant", "content": row["answer"]}]  # fmt: skip
            found = {
                "alone": top_source(client, ns.url, row["followup"]),
                "condensed": top_source(client, ns.url, row["followup"], history),
                "concat": top_source(client, ns.url, f"{row['first']}\n{row['followup']}"),
            }
            if rewrites is not None:
                found["llm"] = top_source(client, ns.url, rewrites[i])
            for method, source in found.items():
                hit = source == row["expected_source"]
                hits[method][(row["split"], row["kind"])].append(hit)
                hits[method][("all", row["kind"])].append(hit)
                hits[method][("all", "all")].append(hit)

    groups = sorted(hits["alone"], key=lambda g: (g[0] == "all", g))
    print(f"{len(rows)} follow-ups from {ns.questions.name} against {ns.url}: hit@1\n")
    print(f"{'split/kind':<24}{'n':>4}" + "".join(f"{m:>11}" for m in hits) + "   vs alone")
    for group in groups:
        n = len(hits["alone"][group])
        rates = {m: sum(h[group]) / n for m, h in hits.items()}
        ratios = " ".join(
            f"{m}={rates[m] / rates['alone']:.2f}x" if rates["alone"] else f"{m}=inf"
            for m in hits
            if m != "alone"
        )
        row = f"{'/'.join(group):<24}{n:>4}" + "".join(f"{r:>11.2f}" for r in rates.values())
        print(f"{row}   {ratios}")
    if rewrites is not None:
        print(f"\nllm: {per_rewrite:.2f} s per rewrite (generate, max_tokens 48, greedy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
