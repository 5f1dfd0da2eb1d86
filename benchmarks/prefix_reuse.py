"""How much prefill a prefix cache can save on the load-test workload, by passage order and layout.

Starts embed and retrieve (one each, real models) with the sample handbook ingested, and for
every question of the workload (default corpus/load_questions.csv, in file order) finds the
passages the edge would put in its prompt (``ChatPipeline.passages``: retrieval, the relevance
floor, the prompt budget). Each prompt is rendered with the default GGUF's chat template and
tokenised exactly as generate does, then replayed through ``PrefixCache`` with generate's rules
(reuse whole 128-token prefill chunks, store a prompt that prefilled >= 64 new tokens, LRU
within the budget; an entry's size is the measured KV bytes per token x its tokens). Printed:
the share of prompt tokens served from cache for

- ``document`` vs ``score`` passage order (decision for ``RAGLINE_API_PASSAGE_ORDER``);
- one shared cache (ragline: one generate replica, or affinity routing over several) vs the
  monolith's reuse (each of 3 instances behind least_conn keeps only its previous prompt, and
  consecutive requests land on different instances).

    python benchmarks/prefix_reuse.py [--questions corpus/load_questions.csv] [--budget-mb 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.stack import Stack  # noqa: E402
from ragline.clients import EmbedStageClient, RetrieveStageClient  # noqa: E402
from services.api.pipeline import AnswerPolicy, ChatPipeline  # noqa: E402
from services.api.prompt import PromptPolicy  # noqa: E402
from services.api.settings import ApiSettings  # noqa: E402
from services.generate.prefix_cache import PrefixCache  # noqa: E402
from services.generate.settings import GenerateSettings  # noqa: E402

CHUNK = GenerateSettings().batch_tokens  # reuse is rounded down to whole prefill chunks


class Sized:
    """Stands in for a saved state in the replay: only its length is used."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def replay_shared(
    prompts: list[list[int]], budget: int, per_token: int, chunk: int = CHUNK
) -> tuple[int, int]:
    cache = PrefixCache(budget)
    total = saved = 0
    for tokens in prompts:
        match = cache.lookup(tokens)
        reuse = 0 if match is None else match.tokens // chunk * chunk
        total += len(tokens)
        saved += reuse
        if cache.worth_storing(len(tokens), reuse):
            cache.insert(tokens, Sized(len(tokens) * per_token))
    return total, saved


def replay_monolith(prompts: list[list[int]], instances: int) -> tuple[int, int]:
    """llama-cpp-python's Llama keeps the previous prompt's KV and reuses its common prefix
    (token-exact); least_conn at saturation spreads consecutive requests round-robin."""
    last: list[list[int]] = [[] for _ in range(instances)]
    total = saved = 0
    for i, tokens in enumerate(prompts):
        prev = last[i % instances]
        n = 0
        while n < min(len(prev), len(tokens) - 1) and prev[n] == tokens[n]:
            n += 1
        total += len(tokens)
        saved += n
        last[i % instances] = tokens
    return total, saved


async def prompts_for(stack: Stack, questions: list[str], tokenize) -> dict[str, list[list[int]]]:
    settings = ApiSettings()
    embed = EmbedStageClient.connect(stack.stages["embed"][0].address)
    retrieve = RetrieveStageClient.connect(stack.stages["retrieve"][0].address)
    pipeline = ChatPipeline(embed, retrieve, None, collection=settings.collection, timeout_s=60,
                            answering=AnswerPolicy.from_settings(settings))  # fmt: skip
    orders = {o: PromptPolicy.from_settings(settings.model_copy(update={"passage_order": o}))
              for o in ("document", "score")}  # fmt: skip
    out: dict[str, list[list[int]]] = {o: [] for o in orders}
    empty = 0
    for q in questions:
        hits = await pipeline.passages(q, settings.default_top_k)
        if not hits:
            empty += 1  # refused before the LLM (nothing above the floor)
            continue
        for order, policy in orders.items():
            messages = policy.layout(q, hits)
            out[order].append(tokenize(messages))
    await embed.close()
    await retrieve.close()
    print(f"{len(questions)} questions, {empty} answered not-found before the LLM")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=Path, default=ROOT / "corpus" / "load_questions.csv")
    ap.add_argument("--budget-mb", type=int, default=1024)
    args = ap.parse_args(argv)
    questions = [r["question"] for r in csv.DictReader(args.questions.open())]

    from ragline.models import DEFAULT_GENERATE_MODEL, resolve_generate_model
    from services.generate.backends.base import ChatMessage
    from services.generate.backends.llamacpp import LlamaCppBackend

    llm = LlamaCppBackend(resolve_generate_model(DEFAULT_GENERATE_MODEL), context_length=2048,
                          max_batch_size=1, cache_tokens=2048, batch_tokens=CHUNK)  # fmt: skip

    def tokenize(messages) -> list[int]:
        return llm.prompt_tokens([ChatMessage(m["role"], m["content"]) for m in messages])[0]

    # KV bytes per token, measured: prefill one prompt and ask llama.cpp for its state size.
    probe = [ChatMessage("user", "hello " * 200)]
    list(llm.generate(probe, llm_params(), lambda: False))
    per_token = measure_state_bytes(llm, probe)

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), {"embed": 1, "retrieve": 1, "generate": 1}, [], "WARNING")
        stack.start(timeout=300)
        try:
            stack.ingest(ROOT / "corpus" / "handbook")
            prompts = asyncio.run(prompts_for(stack, questions, tokenize))
        finally:
            stack.stop()
    budget = args.budget_mb * 2**20
    print(f"KV state: {per_token} bytes per token; budget {args.budget_mb} MiB "
          f"(~{budget // (per_token * 700)} prompts of 700 tokens)")  # fmt: skip
    chunks = (128, 64, 32, 1)
    head = "".join(f"{f'shared/{c}':>12}" for c in chunks)
    print(f"{'order':10} {'prompt tok':>10}{head} {'monolith x3':>12} {'monolith x1':>12}")
    for order, ps in prompts.items():
        row = ""
        for c in chunks:
            total, saved = replay_shared(ps, budget, per_token, c)
            row += f"{saved / total:12.1%}"
        m3 = replay_monolith(ps, 3)
        m1 = replay_monolith(ps, 1)
        print(f"{order:10} {total / len(ps):10.0f}{row} {m3[1] / m3[0]:12.1%} "
              f"{m1[1] / m1[0]:12.1%}")  # fmt: skip
    print(
        "shared/N: one prefix cache, reuse rounded down to N-token prefill chunks "
        f"(generate's batch_tokens; {CHUNK} by default); monolith xN: N instances, each "
        "reusing its previous prompt's common prefix"
    )
    return 0


def llm_params():
    from services.generate.backends.base import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0)


def measure_state_bytes(llm, messages) -> int:
    """Bytes of KV state per prompt token, from one sequence prefilled alone."""
    import ctypes

    seq = llm.prepare(messages, llm_params())
    llm.admit(seq)
    try:
        while seq.prefilling:
            llm.step([seq])
        size = llm._lc.llama_state_seq_get_size(llm.ctx, seq.seq_id)
        buf = (ctypes.c_uint8 * size)()
        llm._lc.llama_state_seq_get_data(llm.ctx, buf, size, seq.seq_id)
    finally:
        llm.release(seq)
    return size // len(seq.prompt)


if __name__ == "__main__":
    raise SystemExit(main())
