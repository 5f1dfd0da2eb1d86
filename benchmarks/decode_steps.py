"""Cost of one decode step by the number of sequences in it: why batching gains little on CPU.

``LlamaCppBackend`` (generate's own code, per-sequence KV streams, 2 threads) with N sequences
admitted and prefilled; then ``--steps`` decode steps are timed, each advancing every sequence
by one token (a step's time is ``llama_decode`` plus sampling). Prints ms per step and the
aggregate tokens/s per N, and each N's tokens/s against one sequence (the baseline): with
weights this small the matmuls are compute-bound already at one sequence, so a step's cost
grows with the tokens in it. ``--q4-0`` adds the same model requantised to Q4_0 (llama.cpp's
own quantiser; repacked AVX2 kernels) as a second row.

    .venv/bin/python benchmarks/decode_steps.py [--sizes 1,2,4,8,16] [--steps 32] [--q4-0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ragline.models import DEFAULT_GENERATE_MODEL, resolve_generate_model  # noqa: E402
from services.generate.backends.base import ChatMessage, SamplingParams  # noqa: E402
from services.generate.backends.llamacpp import LlamaCppBackend  # noqa: E402

LLAMA_FTYPE_MOSTLY_Q4_0 = 2


def step_rate(model: Path, n: int, steps: int, threads: int) -> tuple[float, float]:
    """(ms per decode step, aggregate tokens/s) with ``n`` sequences decoding together."""
    backend = LlamaCppBackend(model, 2048, threads, n, 1024 * n, 64)
    try:
        # A long answer, so no sequence ends inside the timed steps.
        params = SamplingParams(max_tokens=steps + 64, temperature=0.0)
        seqs = []
        for i in range(n):
            messages = [ChatMessage("user", f"Write a long story about harbour number {i}.")]
            seq = backend.prepare(messages, params)
            backend.admit(seq)
            seqs.append(seq)
        while any(s.prefilling or s.next_token is None for s in seqs if not s.done):
            backend.step(seqs)  # prefill, and the first token of each
        tokens, t0 = 0, time.perf_counter()
        for _ in range(steps):
            tokens += backend.step(seqs)
        seconds = time.perf_counter() - t0
        for seq in seqs:
            backend.release(seq)
        return seconds / steps * 1000, tokens / seconds
    finally:
        backend.close()


def requantised(model: Path, out_dir: Path) -> Path:
    import llama_cpp

    out = out_dir / "q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(model).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not requantise {model} to Q4_0")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--q4-0", action="store_true", help="also the model requantised to Q4_0")
    ns = ap.parse_args(argv)
    sizes = [int(x) for x in ns.sizes.split(",")]
    model = resolve_generate_model(DEFAULT_GENERATE_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"default (Q4_1)": model}
        if ns.q4_0:
            models["requantised Q4_0"] = requantised(model, Path(tmp))
        print(f"{model.name}, {ns.threads} threads, {ns.steps} decode steps per size\n")
        print(f"{'model':<18}{'sequences':>10}{'ms/step':>10}{'tok/s':>9}{'vs 1 seq':>10}")
        for name, path in models.items():
            base = None
            for n in sizes:
                ms, rate = step_rate(path, n, ns.steps, ns.threads)
                base = base or (rate if n == sizes[0] else None)
                ratio = f"{rate / base:.2f}x" if base else ""
                print(f"{name:<18}{n:>10}{ms:>10.1f}{rate:>9.1f}{ratio:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
