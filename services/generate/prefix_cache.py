"""PrefixCache: the KV state of earlier prompts, kept in host RAM and shared by every request.

RAG prompts share long prefixes: the system prompt always, and the same passages for questions
about the same topic (the edge lays a prompt out as system prompt, passages in document order,
then the question). After a request's prompt is prefilled, the backend saves that sequence's KV
state here with its prompt tokens; a new request looks up the entry sharing its longest token
prefix, the backend restores that state into the new request's sequence, trims it to the common
prefix, and prefills only the rest (llama.cpp server's ``cache_prompt`` plus ``--cache-ram``,
shared across slots; vLLM's automatic prefix caching does the same with hashed KV blocks).

Bookkeeping only: the cache holds opaque ``state`` bytes and never touches a model, so it is
unit-tested on its own. Entries are evicted least recently used (a hit or an insert counts as a
use) until the stored bytes fit ``budget_bytes``. Lookup compares the new prompt with every
entry's tokens (numpy, one vectorised comparison per entry): with a few hundred entries of a
few hundred tokens it costs microseconds beside a prefill of hundreds of milliseconds, so a
radix tree would buy nothing here. An entry that is a prefix of a newer, longer one is dropped
when that one is stored (the longer one serves every request the shorter one would).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Gauge

LOOKUPS = Counter("ragline_generate_prefix_lookups", "Prompts looked up in the prefix cache")
HITS = Counter("ragline_generate_prefix_hits", "Prompts that reused a cached prefix")
PROMPT_TOKENS = Counter("ragline_generate_prompt_tokens", "Prompt tokens of admitted requests")
CACHED_TOKENS = Counter(
    "ragline_generate_prefix_cached_tokens",
    "Prompt tokens served from the prefix cache (prefill saved); / prompt_tokens = hit ratio",
)
EVICTIONS = Counter("ragline_generate_prefix_evictions", "Prefix-cache entries evicted (LRU)")
BYTES = Gauge("ragline_generate_prefix_cache_bytes", "Bytes of KV state in the prefix cache")
ENTRIES = Gauge("ragline_generate_prefix_cache_entries", "Prompts held in the prefix cache")


@dataclass
class Entry:
    tokens: np.ndarray  # int32, the prompt whose state this is
    state: bytes


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a prompt: reuse ``state``'s first ``tokens`` tokens."""

    tokens: int
    state: bytes


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache:
    def __init__(self, budget_bytes: int, min_tokens: int = 16, min_new_tokens: int = 64) -> None:
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens  # a shorter shared prefix is not worth a restore
        self.min_new_tokens = min_new_tokens
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # oldest use first
        self._next_id = 0
        self.bytes = 0
        self._lock = threading.Lock()  # the scheduler thread writes; metrics and tests read
        self.lookups = self.hits = self.prompt_tokens = self.cached_tokens = self.evictions = 0
        BYTES.set_function(lambda: self.bytes)
        ENTRIES.set_function(lambda: len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def lookup(self, prompt: Sequence[int]) -> Match | None:
        """The entry sharing the longest prefix with ``prompt``, capped one short of the whole
        prompt (its last token must be decoded again to give the first token's logits)."""
        tokens = np.asarray(prompt, dtype=np.int32)
        limit = len(tokens) - 1
        best_id, best = None, 0
        with self._lock:
            for entry_id, entry in self._entries.items():
                n = min(common_prefix(entry.tokens, tokens), limit)
                if n > best:
                    best_id, best = entry_id, n
            if best_id is None or best < self.min_tokens:
                return None
            self._entries.move_to_end(best_id)
            return Match(best, self._entries[best_id].state)

    def record(self, prompt_tokens: int, cached_tokens: int) -> None:
        """One admitted request's prompt and how much of it came from the cache."""
        with self._lock:
            self.lookups += 1
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.hits += cached_tokens > 0
        LOOKUPS.inc()
        PROMPT_TOKENS.inc(prompt_tokens)
        if cached_tokens:
            HITS.inc()
            CACHED_TOKENS.inc(cached_tokens)

    def insert(self, prompt: Sequence[int], state: bytes) -> bool:
        """Keep ``state`` (the KV of exactly ``prompt``); False when it cannot fit at all."""
        if len(state) > self.budget_bytes:
            return False
        tokens = np.asarray(prompt, dtype=np.int32)
        with self._lock:
            for entry_id, entry in list(self._entries.items()):
                if len(entry.tokens) <= len(tokens) and common_prefix(entry.tokens, tokens) == len(
                    entry.tokens
                ):
                    self._drop(entry_id)  # the new entry covers it
            while self._entries and self.bytes + len(state) > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
                EVICTIONS.inc()
            self._entries[self._next_id] = Entry(tokens, state)
            self._next_id += 1
            self.bytes += len(state)
        return True

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.bytes -= len(entry.state)

    def worth_storing(self, prompt_tokens: int, reused: int) -> bool:
        """Store a prompt only when it prefilled at least ``min_new_tokens`` beyond what it
        reused: a new question over cached passages adds a few dozen tokens, and keeping a
        near-copy of its entry for each would crowd other passage sets out of the budget."""
        return self.enabled and prompt_tokens - reused >= self.min_new_tokens

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "budget_bytes": self.budget_bytes,
                "lookups": self.lookups,
                "hits": self.hits,
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "hit_ratio": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
                "evictions": self.evictions,
            }
