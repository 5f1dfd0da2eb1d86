"""llama.cpp (GGUF) on CPU with continuous batching, through llama-cpp-python's C API.

``Llama`` loads the weights, the tokenizer and the chat template (from the GGUF metadata). The
decoding runs on a context of its own with ``n_seq_max`` sequences, each with its own KV
stream of ``cache_tokens / n_seq_max`` cells (which bounds a sequence's context): each
scheduler step builds one ``llama_batch`` that holds one new token for every sequence that is
decoding plus a chunk of prompt for sequences still in prefill (llama.cpp server's scheme),
runs ``llama_decode`` once, and samples every sequence that asked for logits. Weights are read
once per step for all sequences, which is where the aggregate speed-up on a CPU comes from.

A sequence is admitted only when a slot is free and its prompt plus its ``max_tokens`` fit its
stream (checked up front, as TGI and vLLM reserve), so a decode can never run out of cells
midway; what does not fit waits in the engine's queue. Sampling (greedy, temperature, top-k,
top-p, repetition penalty over the last 64 tokens, per-request seed) runs in numpy on the
logits row.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ragline.errors import InvalidArgument
from services.generate.backends.base import (
    BatchingBackend,
    ChatMessage,
    Finished,
    SamplingParams,
)
from services.generate.prefix_cache import PrefixCache

log = logging.getLogger(__name__)
REPEAT_WINDOW = 64


@dataclass
class LlamaSeq:
    """One admitted request: its slot, tokens, sampler state and pending output."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    stops: list[str]
    max_tokens: int
    reserved: int
    rng: np.random.Generator
    n_past: int = 0  # tokens already in the KV cache
    cached: int = 0  # of them, restored from the prefix cache
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet fed back
    held: str = ""  # text withheld while it could be the start of a stop string
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    events: list[str | Finished] = field(default_factory=list)
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


def sample(logits: np.ndarray, params: SamplingParams, recent: list[int], rng) -> int:
    """One token from a logits row: greedy at temperature 0, else top-k/top-p sampling."""
    logits = logits.astype(np.float64, copy=True)
    if params.repetition_penalty != 1.0 and recent:
        ids = np.unique(np.asarray(recent[-REPEAT_WINDOW:], dtype=np.int64))
        vals = logits[ids]
        logits[ids] = np.where(
            vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty
        )
    if params.temperature <= 0:
        return int(np.argmax(logits))
    k = params.top_k if params.top_k > 0 else logits.size
    k = min(k, logits.size)
    top = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    top = top[np.argsort(-logits[top])]
    scaled = logits[top] / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if 0 < params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
    return int(top[rng.choice(len(top), p=probs)])


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold back, stopped). Emits up to a stop string when one
    appears; holds back a tail that could still grow into one."""
    first = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if first >= 0:
        return text[:first], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


class LlamaCppBackend(BatchingBackend):
    name = "llamacpp"

    @classmethod
    def from_settings(cls, path: Path, settings) -> LlamaCppBackend:
        return cls(path, settings.context_length, settings.cpu_threads(), settings.batch_slots(),
                   settings.kv_cells(), settings.batch_tokens,
                   settings.prefix_cache_mb * 2**20)  # fmt: skip

    def __init__(
        self,
        model_path: Path,
        context_length: int = 2048,
        threads: int = 0,
        max_batch_size: int = 8,
        cache_tokens: int = 16384,
        batch_tokens: int = 512,
        prefix_cache_bytes: int = 0,
    ) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not Path(model_path).is_file():
            raise FileNotFoundError(f"llama.cpp needs a .gguf file; {model_path} is not one")
        self._lc = llama_cpp
        n_threads = threads or os.cpu_count() or 1
        # Weights, tokenizer and metadata; its own small context is unused.
        self.llm = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=64, n_batch=64, n_threads=n_threads, verbose=False
        )
        train_ctx = int(self.llm.metadata.get(f"{self.llm.metadata.get('general.architecture')}"
                                              ".context_length", context_length))  # fmt: skip
        self.max_slots = max_batch_size
        # One KV stream per sequence (kv_unified off): a token attends over its own sequence's
        # cells only. Over one unified pool, every token's attention spans every sequence's
        # cells, so a step slows with every sequence admitted (figures in decision 0004). Each
        # sequence gets cache_tokens / max_batch_size cells.
        per_seq = max(256, (cache_tokens // max_batch_size) // 256 * 256)
        self.context_length = min(context_length, train_ctx, per_seq)
        self.cache_tokens = per_seq * max_batch_size
        self.batch_tokens = batch_tokens
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.cache_tokens
        params.n_batch = batch_tokens
        params.n_ubatch = batch_tokens
        params.n_seq_max = max_batch_size
        params.kv_unified = False
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a {self.cache_tokens}-cell context")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self.free_ids = list(range(max_batch_size))
        self.reserved = 0
        self.model_name = self.llm.metadata.get("general.name") or Path(model_path).stem
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{model_path} carries no tokenizer.chat_template in its metadata")
        model = self.llm._model
        self.formatter = Jinja2ChatFormatter(
            template,
            eos_token=model.token_get_text(self.llm.token_eos()),
            bos_token=model.token_get_text(self.llm.token_bos()),
        )
        self._piece = ctypes.create_string_buffer(256)
        self.prefix = PrefixCache(prefix_cache_bytes)
        log.info("llama.cpp: %d sequences over %d KV cells, batches of %d tokens, %d threads, "
                 "prefix cache %d MiB", max_batch_size, self.cache_tokens, batch_tokens,
                 n_threads, prefix_cache_bytes >> 20)  # fmt: skip

    # --- requests ---------------------------------------------------------------------------

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> tuple[list[int], list[str]]:
        formatted = self.formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages]
        )
        tokens = self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop or ""]
        return tokens, [s for s in stops if s]

    def prepare(self, messages: Sequence[ChatMessage], params: SamplingParams) -> LlamaSeq:
        tokens, template_stops = self.prompt_tokens(messages)
        room = self.context_length - len(tokens)
        if room < 1:
            raise InvalidArgument(
                f"prompt is {len(tokens)} tokens; the context holds {self.context_length}: "
                "shorten the messages or retrieve fewer passages"
            )
        max_tokens = min(params.max_tokens, room)
        return LlamaSeq(
            seq_id=-1,
            prompt=tokens,
            params=params,
            stops=[*template_stops, *params.stop],
            max_tokens=max_tokens,
            reserved=len(tokens) + max_tokens,
            rng=np.random.default_rng(params.seed),
        )

    def can_admit(self, seq: LlamaSeq) -> bool:
        return bool(self.free_ids) and self.reserved + seq.reserved <= self.cache_tokens

    def admit(self, seq: LlamaSeq) -> None:
        seq.seq_id = self.free_ids.pop()
        self.reserved += seq.reserved
        if self.prefix.enabled:
            self._restore_prefix(seq)
            self.prefix.record(len(seq.prompt), seq.cached)

    # --- prefix cache: sequence state saved after prefill, restored at admission ------------

    def _restore_prefix(self, seq: LlamaSeq) -> None:
        """Start ``seq`` from the longest cached prefix of its prompt, if any: the saved state
        goes into its (empty) KV stream, is trimmed to the common prefix, and prefill resumes
        there. The restored cells are the bytes the earlier prefill wrote, so the result is the
        same as prefilling them again."""
        match = self.prefix.lookup(seq.prompt)
        # Reuse whole prefill chunks only: the rest is then cut into exactly the chunks a fresh
        # prefill would make, and llama.cpp's results depend on a chunk's size and padded
        # attention span. Anything else changes a greedy answer now and then (measured).
        reuse = 0 if match is None else match.tokens // self.batch_tokens * self.batch_tokens
        if reuse == 0:
            return
        # llama.cpp reads the saved bytes in place (no copy of the ~10 MB state first)
        src = ctypes.cast(ctypes.c_char_p(match.state), ctypes.POINTER(ctypes.c_uint8))
        if not self._lc.llama_state_seq_set_data(self.ctx, src, len(match.state), seq.seq_id):
            log.warning("prefix cache: llama.cpp refused a saved state; prefilling in full")
            self._lc.llama_memory_seq_rm(self.mem, seq.seq_id, -1, -1)
            return
        self._lc.llama_memory_seq_rm(self.mem, seq.seq_id, reuse, -1)
        seq.n_past = seq.cached = reuse

    def _save_prefix(self, seq: LlamaSeq) -> None:
        """Called right after ``seq``'s last prompt token was decoded: its stream then holds
        exactly the prompt."""
        if not self.prefix.worth_storing(len(seq.prompt), seq.cached):
            return
        size = self._lc.llama_state_seq_get_size(self.ctx, seq.seq_id)
        if size > self.prefix.budget_bytes:
            return
        buf = (ctypes.c_uint8 * size)()
        written = self._lc.llama_state_seq_get_data(self.ctx, buf, size, seq.seq_id)
        if written:
            self.prefix.insert(seq.prompt, ctypes.string_at(buf, written))  # one copy

    def release(self, seq: LlamaSeq) -> None:
        if seq.seq_id < 0:
            return
        self._lc.llama_memory_seq_rm(self.mem, seq.seq_id, -1, -1)
        self.free_ids.append(seq.seq_id)
        self.reserved -= seq.reserved
        seq.seq_id = -1

    def cache_usage(self) -> float:
        return self.reserved / self.cache_tokens

    # --- one scheduler step -----------------------------------------------------------------

    def step(self, seqs: Sequence[LlamaSeq]) -> int:
        """Advance every sequence once: decoding ones by one token, prefilling ones by a chunk.
        Returns the tokens put through the model."""
        b = self.batch
        n = 0
        wants: list[tuple[LlamaSeq, int]] = []  # (sequence, batch index of its logits)
        for seq in seqs:  # decoding sequences first: one token each keeps them moving
            if seq.done or seq.prefilling or seq.next_token is None:
                continue
            if n >= self.batch_tokens:
                break
            self._put(b, n, seq.next_token, seq.n_past, seq.seq_id, True)
            seq.generated.append(seq.next_token)
            seq.next_token = None
            seq.n_past += 1
            wants.append((seq, n))
            n += 1
        for seq in seqs:  # then prompt chunks within what is left of the batch
            if seq.done or not seq.prefilling or n >= self.batch_tokens:
                continue
            take = min(len(seq.prompt) - seq.n_past, self.batch_tokens - n)
            for j in range(take):
                last = seq.n_past + j == len(seq.prompt) - 1
                self._put(b, n, seq.prompt[seq.n_past + j], seq.n_past + j, seq.seq_id, last)
                if last:
                    wants.append((seq, n))
                n += 1
            seq.n_past += take
        if n == 0:
            return 0
        b.n_tokens = n
        rc = self._lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} tokens")
        for seq, idx in wants:
            if not seq.generated and self.prefix.enabled:  # its prompt was just prefilled
                self._save_prefix(seq)
            ptr = self._lc.llama_get_logits_ith(self.ctx, idx)
            logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            self._on_token(seq, sample(logits, seq.params, seq.prompt + seq.generated, seq.rng))
        return n

    @staticmethod
    def _put(b, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = 1 if logits else 0

    def _on_token(self, seq: LlamaSeq, token: int) -> None:
        if self._lc.llama_vocab_is_eog(self.vocab, token):
            self._finish(seq, "stop")
            return
        n = self._lc.llama_token_to_piece(self.vocab, token, self._piece, 256, 0, False)
        text = seq.held + seq.decoder.decode(self._piece.raw[: max(n, 0)])
        emit, seq.held, stopped = split_stop(text, seq.stops)
        if emit:
            seq.events.append(emit)
        if stopped:
            self._finish(seq, "stop", count_last=True)
        elif len(seq.generated) + 1 >= seq.max_tokens:
            self._finish(seq, "length", count_last=True)
        else:
            seq.next_token = token

    def _finish(self, seq: LlamaSeq, reason: str, count_last: bool = False) -> None:
        tail = seq.held + seq.decoder.decode(b"", final=True) if reason == "length" else ""
        if tail:
            seq.events.append(tail)
        completion = len(seq.generated) + (1 if count_last else 0)
        seq.events.append(Finished(reason, len(seq.prompt), completion, cached_tokens=seq.cached))
        seq.done = True

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._lc.llama_batch_free(self.batch)
            self._lc.llama_free(self.ctx)
            self.ctx = None
