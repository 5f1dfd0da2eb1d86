"""Answer quality of POST /chat on a labelled question set, one column per configuration.

For each question of corpus/answer_quality/<corpus>.csv (see its README) and each configuration
(a set of /chat request fields), the script asks /chat once, with ``Cache-Control: no-cache`` so
that every answer is computed, and scores the answer: on answerable rows, the fact pattern
matched and not refused (counted apart by the ``extractive`` flag), a false refusal or a wrong
answer; on unanswerable rows, a refusal (``not_found``, or the refusal wording on an edge without
the flag); the cited passages, against the fact (does the cited text hold it?) and against the
expected page. Retrieval gets one extra request per answerable question, shared by the
configurations (one per distinct ``mode``): top_k=5, score_threshold 0, the extractive answerer
(no LLM; an edge without one generates a single token). Its sources, best first (or ``closest``
when it found nothing), give hit@1 and hit@5; the edge returns only the passages its prompt
budget holds, which may be fewer than 5, so the table says how many came back. Latency is the
client's time for each configuration's request.

Unless --url names a running edge, the script starts embed, retrieve, generate and the edge from
this tree on free loopback ports, with RAGLINE_DATA_DIR in a temporary directory, and ingests the
corpus (file names as document ids).

    .venv/bin/python benchmarks/answer_quality.py --corpus handbook --split tune \\
        --config gen:answerer=generate --config extr:answerer=extractive \\
        --config auto-t35:answerer=auto,score_threshold=0.35 --show-wrong --json aq.json
    .venv/bin/python benchmarks/answer_quality.py --corpus debian \\
        --generate-arg=--model=/models/x.gguf --api-arg=--context-tokens=1200
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUESTION_DIR = ROOT / "corpus" / "answer_quality"
CORPORA = {  # name: (directory, glob of its documents)
    "handbook": (ROOT / "corpus" / "handbook", "*.md"),
    "debian": (ROOT / "corpus" / "debian" / "postfix-doc", "*_README.txt"),
}
DEFAULT_CONFIGS = {
    "generate": {"answerer": "generate"},
    "extractive": {"answerer": "extractive"},
    "auto": {"answerer": "auto"},
}
REQUEST_FIELDS = ("top_k", "max_tokens", "score_threshold", "answerer", "mode")
RETRIEVAL_K = 5
REFUSAL = re.compile(  # contractions too: "doesn't mention" is as much a refusal
    r"not (found|in|mentioned|covered|contain\w*)\b|do(es)?( not|n['’]t) (say|mention|know|state"
    r"|specify)|no information|can(not|['’]t) find|(is|are)( not|n['’]t) (covered|mentioned)"
    r"|I don['’]t know|I['’]?m not sure|I am not sure",
    re.IGNORECASE,
)
# What a harness or model puts in front of the answer ("Answer:", "**Answer:**").
PREFIX = re.compile(r"^\s*[*_]*\s*(?:final\s+)?answer\s*[:：]\s*[*_]*\s*", re.IGNORECASE)
MARKER = re.compile(r"\[([^\[\]\n]{1,400})\]")


@dataclass(frozen=True)
class Question:
    id: str
    split: str
    question: str
    answerable: bool
    expected_source: str
    fact_pattern: str
    kind: str


def load_questions(path: Path) -> list[Question]:
    with path.open(newline="", encoding="utf-8") as f:
        return [
            Question(r["id"], r["split"], r["question"], r["answerable"] == "yes",
                     r["expected_source"], r["fact_pattern"], r["kind"])
            for r in csv.DictReader(f)
        ]  # fmt: skip


# ---------------------------------------------------------------- scoring (pure functions)


def answer_text(answer: str) -> str:
    """The answer as the model wrote it, without a leading ``Answer:``-style wrapper."""
    return PREFIX.sub("", answer, count=1)


def holds_fact(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.IGNORECASE) is not None


def refused(body: Mapping) -> bool:
    """The edge's ``not_found`` when it sends one; else whether the answer reads as a refusal."""
    if body.get("not_found") is not None:
        return bool(body["not_found"])
    return REFUSAL.search(answer_text(str(body.get("answer", "")))) is not None


def source_of(passage: Mapping) -> str:
    """A passage's document id: ``metadata.source``, else its id without ``#chunk``."""
    meta = passage.get("metadata") or {}
    return str(meta.get("source") or str(passage.get("id", "")).rsplit("#", 1)[0])


def cited_passages(body: Mapping) -> list[Mapping]:
    """The passages the answer cites, each once, in citation order.

    ``citations`` when the edge sends it (an id it does not return cites empty text); else the
    ``[id]`` markers of the answer (several ids may share one bracket) that name a returned
    passage, or a returned passage's document (which cites that document's passages).
    """
    pool = [*(body.get("sources") or []), *(body.get("closest") or [])]
    by_id: dict[str, Mapping] = {}
    by_doc: dict[str, list[Mapping]] = {}
    for p in pool:
        if str(p.get("id", "")) not in by_id:
            by_id[str(p.get("id", ""))] = p
            by_doc.setdefault(source_of(p), []).append(p)
    cited: list[Mapping] = []
    if body.get("citations") is not None:
        for c in body["citations"]:
            cid = str(c.get("id", ""))
            cited.append(by_id.get(cid) or {"id": cid, "text": "", "metadata": {}})
    else:
        for m in MARKER.finditer(str(body.get("answer", ""))):
            for name in re.split(r"\s*[,;]\s*|\s+and\s+", m.group(1)):
                name = name.strip().strip("`'\"")
                if name in by_id:
                    cited.append(by_id[name])
                else:
                    cited.extend(by_doc.get(name, []))
    unique: dict[str, Mapping] = {}
    for p in cited:
        unique.setdefault(str(p.get("id", "")), p)
    return list(unique.values())


def fact_parts(pattern: str) -> list[str]:
    """The facts of a several-fact pattern: its top-level positive lookaheads with its leading
    flags (``(?s)(?=.*A)(?=.*B)`` gives ``(?s).*A`` and ``(?s).*B``); [] for a one-fact one."""
    flags = re.match(r"(?:\(\?[aiLmsux]+\))*", pattern).group(0)
    rest = pattern[len(flags) :]
    parts: list[str] = []
    depth, start, i, in_class = 0, -1, 0, False
    while i < len(rest):
        c = rest[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            if depth == 0 and rest.startswith("(?=", i):
                start = i + 3
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0 and start >= 0:
                parts.append(flags + rest[start:i])
                start = -1
        i += 1
    return parts if len(parts) >= 2 else []


def citation_precision(
    pattern: str, expected_source: str, passages: Sequence[Mapping]
) -> tuple[int, int]:
    """(cited passages whose text holds the fact, cited passages from the expected page).

    A several-fact pattern rarely sits in one passage: there a passage holds the fact when the
    text of all cited passages together matches the pattern and the passage holds one of its
    facts (so an irrelevant extra citation still counts against precision).
    """
    texts = [str(p.get("text", "")) for p in passages]
    parts = fact_parts(pattern)
    if parts:
        together = holds_fact(pattern, "\n\n".join(texts))
        text_ok = sum(together and any(holds_fact(f, t) for f in parts) for t in texts)
    else:
        text_ok = sum(holds_fact(pattern, t) for t in texts)
    return text_ok, sum(source_of(p) == expected_source for p in passages)


@dataclass(frozen=True)
class Score:
    """One answer. ``outcome``: correct | wrong | false_refusal on answerable rows, refused |
    answered on unanswerable ones, error when no answer came back."""

    outcome: str
    extractive: bool = False
    cited: int = 0
    cited_text_ok: int = 0
    cited_page_ok: int = 0


def score_answer(q: Question, body: Mapping | None) -> Score:
    if body is None:
        return Score("error")
    refusal = refused(body)
    if not q.answerable:
        return Score("refused" if refusal else "answered", bool(body.get("extractive", False)))
    # Without its refusal wording: "I do not know" must not pass a "no"-verdict pattern
    # (``\bnot\b``), while "27 days; carry-over is not covered" still holds 27.
    text = REFUSAL.sub(" ", answer_text(str(body.get("answer", ""))))
    if holds_fact(q.fact_pattern, text) and not body.get("not_found", False):
        outcome = "correct"
    else:
        outcome = "false_refusal" if refusal else "wrong"
    cited = [] if outcome == "false_refusal" else cited_passages(body)
    text_ok, page_ok = citation_precision(q.fact_pattern, q.expected_source, cited)
    return Score(outcome, bool(body.get("extractive", False)), len(cited), text_ok, page_ok)


def ranked_pages(body: Mapping | None) -> list[str]:
    """Document ids of the passages an answer came with, best first (``closest`` when refused)."""
    if body is None:
        return []
    passages = body.get("sources") or []
    if body.get("not_found") and body.get("closest"):
        passages = body["closest"]
    return [source_of(p) for p in passages or body.get("closest") or []]


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(records: Iterable[Mapping]) -> dict[str, float | int]:
    """Counts and shares over per-question records (``Score`` fields plus ``answerable``,
    ``latency_ms``, ``hit1``, ``hit5``)."""
    rows = list(records)
    ans = [r for r in rows if r["answerable"]]
    unans = [r for r in rows if not r["answerable"]]
    answered_cited = [r for r in ans if r["outcome"] != "false_refusal" and r["cited"] > 0]
    citations = sum(r["cited"] for r in answered_cited)
    with_hits = [r for r in ans if r.get("hit1") is not None]
    latencies = [r["latency_ms"] for r in rows if r["outcome"] != "error"]

    def share(n: float, d: float) -> float:
        return n / d if d else math.nan

    correct = [r for r in ans if r["outcome"] == "correct"]
    return {
        "answerable": len(ans),
        "correct": len(correct),
        "generated_right": sum(not r["extractive"] for r in correct),
        "extractive_right": sum(bool(r["extractive"]) for r in correct),
        "false_refusals": sum(r["outcome"] == "false_refusal" for r in ans),
        "unanswerable": len(unans),
        "refused": sum(r["outcome"] == "refused" for r in unans),
        "cited_rows": len(answered_cited),
        "citations": citations,
        "cited_text_precision": share(sum(r["cited_text_ok"] for r in answered_cited), citations),
        "cited_page_precision": share(sum(r["cited_page_ok"] for r in answered_cited), citations),
        "uncited": sum(r["cited"] == 0 and r["outcome"] != "error" for r in ans),
        "hit1": share(sum(bool(r["hit1"]) for r in with_hits), len(with_hits)),
        "hit5": share(sum(bool(r["hit5"]) for r in with_hits), len(with_hits)),
        "retrieved_per_q": share(sum(r.get("retrieved") or 0 for r in with_hits), len(with_hits)),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "errors": sum(r["outcome"] == "error" for r in rows),
    }


def format_table(title: str, summaries: Mapping[str, Mapping]) -> str:
    """One row per measure, one column per configuration."""

    def frac(n: int, d: int) -> str:
        return f"{n}/{d} {100 * n / d:.0f}%" if d else "-"

    def num(x: float, fmt: str) -> str:
        return "-" if math.isnan(x) else format(x, fmt)

    measures = [
        ("answerable correct", lambda s: frac(s["correct"], s["answerable"])),
        ("  generated-right", lambda s: str(s["generated_right"])),
        ("  extractive-right", lambda s: str(s["extractive_right"])),
        ("  false refusals", lambda s: frac(s["false_refusals"], s["answerable"])),
        ("unanswerable refused", lambda s: frac(s["refused"], s["unanswerable"])),
        ("cited text holds fact", lambda s: num(s["cited_text_precision"], ".2f")),
        ("cited page = expected", lambda s: num(s["cited_page_precision"], ".2f")),
        ("  citations (rows)", lambda s: f"{s['citations']} ({s['cited_rows']})"),
        ("uncited answerable", lambda s: frac(s["uncited"], s["answerable"])),
        ("hit@1", lambda s: num(s["hit1"], ".2f")),
        (f"hit@{RETRIEVAL_K}", lambda s: num(s["hit5"], ".2f")),
        ("  passages returned/q", lambda s: num(s["retrieved_per_q"], ".1f")),
        ("P50 ms", lambda s: num(s["p50_ms"], ".0f")),
        ("P95 ms", lambda s: num(s["p95_ms"], ".0f")),
        ("errors", lambda s: str(s["errors"])),
    ]
    width = max(14, *(len(n) + 2 for n in summaries))
    lines = [title, f"{'':<24}" + "".join(f"{n:>{width}}" for n in summaries)]
    for label, cell in measures:
        lines.append(f"{label:<24}" + "".join(f"{cell(s):>{width}}" for s in summaries.values()))
    return "\n".join(lines)


def parse_config(spec: str) -> tuple[str, dict[str, object]]:
    """``NAME:key=value,key=value`` (values as JSON where they parse: numbers, true, null), or
    the name of a default configuration."""
    name, sep, body = spec.partition(":")
    if not sep:
        if name in DEFAULT_CONFIGS:
            return name, dict(DEFAULT_CONFIGS[name])
        raise ValueError(f"--config {spec!r}: write NAME:key=value,... (or one of "
                         f"{', '.join(DEFAULT_CONFIGS)})")  # fmt: skip
    fields: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in REQUEST_FIELDS:
            raise ValueError(f"--config {spec!r}: {item!r} is not key=value with a key among "
                             f"{', '.join(REQUEST_FIELDS)}")  # fmt: skip
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return name, fields


# ---------------------------------------------------------------- running


async def ask(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[dict | None, float, str]:
    """(body or None, client-side ms, error)."""
    t0 = time.perf_counter()
    try:
        r = await client.post(f"{url}/chat", json=payload, headers={"Cache-Control": "no-cache"})
    except httpx.HTTPError as exc:
        return None, (time.perf_counter() - t0) * 1000, f"{type(exc).__name__}: {exc}"
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        return None, ms, f"HTTP {r.status_code}: {r.text[:300]}"
    return r.json(), ms, ""


async def run(
    url: str,
    questions: Sequence[Question],
    configs: Mapping[str, Mapping],
    max_tokens: int,
    concurrency: int,
    timeout: float,
) -> tuple[list[dict], list[dict]]:
    """Per-question rows of every configuration, and the retrieval pass's rows."""
    modes = list(dict.fromkeys(c.get("mode") for c in configs.values()))
    rows: list[dict] = []
    retrieval: list[dict] = []
    todo = iter(enumerate(questions))
    async with httpx.AsyncClient(timeout=timeout) as client:

        async def worker() -> None:
            for i, q in todo:
                hits: dict[object, tuple[bool, bool, int]] = {}
                for mode in modes if q.answerable else ():
                    payload = {"query": q.question, "top_k": RETRIEVAL_K, "score_threshold": 0.0,
                               "answerer": "extractive", "max_tokens": 1}  # fmt: skip
                    if mode is not None:
                        payload["mode"] = mode
                    body, _, error = await ask(client, url, payload)
                    pages = ranked_pages(body)
                    if body is not None:  # a failed pass is left out of hit@k, and reported
                        top = pages[:RETRIEVAL_K]
                        hits[mode] = (top[:1] == [q.expected_source], q.expected_source in top,
                                      len(pages))  # fmt: skip
                    retrieval.append({"id": q.id, "mode": mode, "pages": pages, "error": error})
                marks = []
                for name, fields in configs.items():
                    payload = {"query": q.question, "max_tokens": max_tokens, **fields}
                    body, ms, error = await ask(client, url, payload)
                    score = score_answer(q, body)
                    hit1, hit5, found = hits.get(fields.get("mode"), (None, None, None))
                    rows.append({
                        "config": name, "id": q.id, "split": q.split, "kind": q.kind,
                        "answerable": q.answerable, **asdict(score), "latency_ms": ms,
                        "hit1": hit1, "hit5": hit5, "retrieved": found, "question": q.question,
                        "fact_pattern": q.fact_pattern, "expected_source": q.expected_source,
                        "answer": None if body is None else body.get("answer", ""),
                        "not_found": None if body is None else body.get("not_found"),
                        "pages": ranked_pages(body), "error": error,
                        "response": body,
                    })  # fmt: skip
                    marks.append(f"{name}={score.outcome}")
                print(f"[{i + 1}/{len(questions)}] {q.id} {' '.join(marks)}", file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    order = {q.id: i for i, q in enumerate(questions)}
    rows.sort(key=lambda r: (list(configs).index(r["config"]), order[r["id"]]))
    return rows, retrieval


def start_stack(corpus: str, workdir: Path, stage_args: Mapping[str, list[str]], api_args):
    """The four services of this tree on free loopback ports, the corpus ingested."""
    from benchmarks.stack import Stack

    stack = Stack(workdir, {"embed": 1, "retrieve": 1, "generate": 1}, list(api_args), "WARNING")
    stack.env.update(OTEL_SDK_DISABLED="true", RAGLINE_LOG_FORMAT="text")
    for stage, extra in stage_args.items():
        stack.stages[stage][0].argv += extra
    try:
        stack.start(timeout=300)
        directory, pattern = CORPORA[corpus]
        for path in sorted(directory.glob(pattern)):
            r = httpx.post(f"{stack.base}/documents", timeout=600,
                           json={"document_id": path.name, "text": path.read_text()})  # fmt: skip
            r.raise_for_status()
    except BaseException:
        for p in stack.all():
            if p.log_path.exists():
                print(f"--- {p.name} log (tail)\n{p.log_path.read_text()[-2000:]}", file=sys.stderr)
        stack.stop()
        raise
    return stack


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="handbook")
    ap.add_argument("--url", help="a running edge with the corpus ingested (else start a stack)")
    ap.add_argument("--config", action="append", default=[], metavar="NAME:key=value,...",
                    help=f"request fields of one configuration (keys: {', '.join(REQUEST_FIELDS)})"
                    f"; default: {', '.join(DEFAULT_CONFIGS)}")  # fmt: skip
    ap.add_argument("--split", choices=("tune", "heldout", "all"), default="tune")
    ap.add_argument("--limit", type=int, help="only the first N questions of each split")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request")
    for stage in ("embed", "retrieve", "generate", "api"):
        ap.add_argument(f"--{stage}-arg", action="append", default=[], metavar="FLAG",
                        help=f"extra flag for the {stage} service (repeatable)")  # fmt: skip
    ap.add_argument("--show-wrong", action="store_true", help="list the wrong answers")
    ap.add_argument("--json", type=Path, help="write summaries and per-question rows here")
    ns = ap.parse_args()
    try:
        configs = dict(parse_config(s) for s in ns.config) or dict(DEFAULT_CONFIGS)
    except ValueError as exc:
        ap.error(str(exc))
    splits = ["tune", "heldout"] if ns.split == "all" else [ns.split]
    every = load_questions(QUESTION_DIR / f"{ns.corpus}.csv")
    chosen = {s: [q for q in every if q.split == s][: ns.limit or None] for s in splits}
    questions = [q for q in every if q in chosen.get(q.split, ())]  # the file's order

    stack = None
    url = ns.url
    if url is None:
        workdir = Path(tempfile.mkdtemp(prefix="ragline-answer-quality-"))
        stage_args = {s: getattr(ns, f"{s}_arg") for s in ("embed", "retrieve", "generate")}
        t0 = time.monotonic()
        stack = start_stack(ns.corpus, workdir, stage_args, ns.api_arg)
        url = stack.base
        print(f"stack up, {ns.corpus} ingested in {time.monotonic() - t0:.0f}s; logs in "
              f"{stack.logs}", file=sys.stderr)  # fmt: skip
    try:
        t0 = time.monotonic()
        rows, retrieval = asyncio.run(
            run(url, questions, configs, ns.max_tokens, ns.concurrency, ns.timeout)
        )
        elapsed = time.monotonic() - t0
    finally:
        if stack is not None:
            stack.stop()

    summary = {
        split: {name: summarize(r for r in rows if r["config"] == name and r["split"] == split)
                for name in configs}
        for split in splits
    }  # fmt: skip
    print(f"\n{ns.corpus}: {len(questions)} questions x {len(configs)} configurations in "
          f"{elapsed:.0f}s against {ns.url or 'a fresh stack of this tree'}, max_tokens "
          f"{ns.max_tokens}, concurrency {ns.concurrency}")  # fmt: skip
    for name, fields in configs.items():
        print(f"  {name}: {json.dumps(fields)}")
    for split in splits:
        print("\n" + format_table(f"{split} ({len(chosen[split])} questions)", summary[split]))
    if any(r["error"] for r in retrieval):
        print(f"\nretrieval pass: {sum(bool(r['error']) for r in retrieval)} requests failed")
    if ns.show_wrong:
        for name in configs:
            bad = [r for r in rows if r["config"] == name
                   and r["outcome"] in ("wrong", "false_refusal", "answered", "error")]  # fmt: skip
            print(f"\nwrong answers, {name} ({len(bad)}):")
            for r in bad:
                said = r["error"] or " ".join(str(r["answer"]).split())
                said = said if len(said) <= 160 else said[:157] + "..."
                print(f"  {r['id']} [{r['outcome']}] {r['question']}\n      answer: {said}\n"
                      f"      expected: {r['fact_pattern'] or 'a refusal'}"
                      f" ({r['expected_source'] or '-'})")  # fmt: skip
    if ns.json:
        summary = {sp: {n: {k: None if isinstance(v, float) and math.isnan(v) else v
                            for k, v in m.items()} for n, m in s.items()}
                   for sp, s in summary.items()}  # fmt: skip
        ns.json.write_text(json.dumps({
            "corpus": ns.corpus, "split": ns.split, "url": ns.url, "max_tokens": ns.max_tokens,
            "concurrency": ns.concurrency, "configs": configs, "elapsed_s": elapsed,
            "summary": summary, "rows": rows, "retrieval": retrieval,
        }, indent=1, default=str) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
