"""Prefill rate of the default GGUF by prefill chunk size (generate's ``batch_tokens``).

One 350-token handbook prompt, prefilled alone by ``LlamaCppBackend`` with each chunk size in
turn (interleaved, best of ``--runs``), 2 threads: what the prefix cache's rounding to whole
chunks (decision 0009) costs in prefill speed. Prints tokens/s beside the 128-token baseline.

    .venv/bin/python benchmarks/prefill_chunks.py [--sizes 32,64,128,256] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ragline.models import DEFAULT_GENERATE_MODEL, resolve_generate_model  # noqa: E402
from services.generate.backends.base import ChatMessage, SamplingParams  # noqa: E402
from services.generate.backends.llamacpp import LlamaCppBackend  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="32,64,128,256")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    text = (ROOT / "corpus" / "handbook" / "annual-leave.md").read_text()[:1500]
    messages = [ChatMessage("system", text), ChatMessage("user", "How many days?")]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    model = resolve_generate_model(DEFAULT_GENERATE_MODEL)
    backends = {n: LlamaCppBackend(model, 2048, 2, 1, 2048, n) for n in sizes}
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(args.runs):
        for n, b in backends.items():
            t0 = time.perf_counter()
            list(b.generate(messages, one, lambda: False))
            best[n] = min(best[n], time.perf_counter() - t0)
    tokens = len(backends[sizes[0]].prompt_tokens(messages)[0])
    base = tokens / best[128] if 128 in best else None
    print(f"{tokens}-token prompt, best of {args.runs}")
    for n in sizes:
        rate = tokens / best[n]
        ratio = f"  {rate / base:.2f}x the 128-token chunk" if base else ""
        print(f"chunk {n:4d}: {rate:6.0f} tokens/s{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
