"""The prefix cache on the real llama.cpp backend (SmolLM2): same greedy answers with it on and
off, a hit prefills only the suffix, and the stored state stays within the memory budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragline.models import DEFAULT_GENERATE_MODEL, resolve_generate_model
from services.generate.backends.base import ChatMessage, Finished, SamplingParams
from services.generate.backends.llamacpp import LlamaCppBackend
from services.generate.settings import GenerateSettings

HANDBOOK = Path(__file__).resolve().parents[2] / "corpus" / "handbook"
CHUNK = GenerateSettings().batch_tokens
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, seed=0)


def backend(prefix_cache_bytes: int) -> LlamaCppBackend:
    return LlamaCppBackend(resolve_generate_model(DEFAULT_GENERATE_MODEL), context_length=1024,
                           threads=2, max_batch_size=2, cache_tokens=2048, batch_tokens=CHUNK,
                           prefix_cache_bytes=prefix_cache_bytes)  # fmt: skip


def messages(doc: str, question: str) -> list[ChatMessage]:
    sources = (HANDBOOK / doc).read_text()[:1200]
    system = f"Answer using only the sources below.\n\nSources:\n[{doc}#0] {sources}"
    return [ChatMessage("system", system), ChatMessage("user", question)]


def run(b: LlamaCppBackend, msgs: list[ChatMessage]) -> tuple[str, Finished]:
    events = list(b.generate(msgs, GREEDY, lambda: False))
    return "".join(e for e in events if isinstance(e, str)), events[-1]


@pytest.fixture(scope="module")
def backends():
    off, on = backend(0), backend(256 * 2**20)
    yield off, on
    off.close()
    on.close()


PROMPTS = [
    ("annual-leave.md", "How many days of leave do I get per year?"),
    ("annual-leave.md", "Can I carry unused days over to next year?"),
    ("sick-leave.md", "When do I need a doctor's note?"),
    ("annual-leave.md", "How many days of leave do I get per year?"),  # repeated exactly
    ("sick-leave.md", "Who do I tell when I am ill?"),
]


def test_greedy_answers_are_identical_with_the_cache_on_and_off(backends) -> None:
    off, on = backends
    for doc, question in PROMPTS:
        want, _ = run(off, messages(doc, question))
        got, done = run(on, messages(doc, question))
        assert got == want, (doc, question)
    assert on.prefix.stats()["hits"] >= 3  # the later prompts did reuse a prefix


def test_a_hit_prefills_only_the_suffix(backends) -> None:
    _, on = backends
    first = messages("payroll.md", "When is salary paid each month?")
    second = messages("payroll.md", "Who do I contact about a wrong payslip?")
    _, a = run(on, first)
    assert a.cached_tokens == 0  # nothing cached about payroll yet
    _, b = run(on, second)
    p1, _ = on.prompt_tokens(first)
    p2, _ = on.prompt_tokens(second)
    shared = next(i for i, (x, y) in enumerate(zip(p1, p2, strict=False)) if x != y)
    # whole prefill chunks of the shared prefix are reused; the rest is prefilled
    assert b.prompt_tokens == len(p2) and b.cached_tokens == shared // CHUNK * CHUNK > 0
    assert len(p2) - b.cached_tokens < CHUNK + 30


def test_eviction_keeps_the_stored_state_within_the_budget() -> None:
    b = backend(16 * 2**20)  # room for two ~7 MB prompts
    try:
        for doc in ("pension.md", "payroll.md", "remote-work.md", "sick-leave.md", "pension.md"):
            run(b, messages(doc, "What does this policy say?"))
            assert b.prefix.bytes <= 16 * 2**20
        stats = b.prefix.stats()
        assert stats["evictions"] >= 1 and 1 <= stats["entries"] <= 2
    finally:
        b.close()
