"""AnswerCache: exact-match cache of answers, in-process or in Redis, invalidated by writes.

The key is the normalised question (case, spacing and trailing punctuation folded), every
parameter that changes the answer, and the knowledge base's version: the searched collection's
version as reported by retrieve. A write made anywhere (this edge, another replica, ``ragline
ingest``) changes the version, so older entries are never served again; they age out by TTL.
A hit skips every stage. Redis errors degrade to a miss: the cache never takes the edge down.
``SemanticCache`` optionally adds near-duplicate questions (embedding cosine).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict

import numpy as np

log = logging.getLogger(__name__)
_SPACE = re.compile(r"\s+")


def normalise(query: str) -> str:
    return _SPACE.sub(" ", query.casefold()).strip().rstrip("?!. ")


class AnswerCache:
    def __init__(self, ttl_s: float, max_entries: int = 10_000, redis_url: str | None = None):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._redis = None
        if redis_url:
            import redis.asyncio as redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=0.5)
        self.hits = 0
        self.misses = 0

    @property
    def backend(self) -> str:
        return "redis" if self._redis is not None else "memory"

    @staticmethod
    def key(query: str, version: int, **params: object) -> str:
        raw = json.dumps([normalise(query), version, sorted(params.items())], default=str)
        return "ragline:answer:" + hashlib.sha256(raw.encode()).hexdigest()

    async def get(self, key: str) -> dict | None:
        value: str | bytes | None = None
        if self._redis is not None:
            try:
                value = await self._redis.get(key)
            except Exception as exc:  # degrade to a miss
                log.warning("cache read failed: %s", exc)
        else:
            entry = self._local.get(key)
            if entry and entry[0] > time.monotonic():
                self._local.move_to_end(key)
                value = entry[1]
            elif entry:
                del self._local[key]
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(value)

    async def set(self, key: str, answer: dict) -> None:
        value = json.dumps(answer)
        if self._redis is not None:
            try:
                await self._redis.set(key, value, ex=max(1, int(self.ttl_s)))
            except Exception as exc:
                log.warning("cache write failed: %s", exc)
            return
        self._local[key] = (time.monotonic() + self.ttl_s, value)
        self._local.move_to_end(key)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


class SemanticCache:
    """In-process cache keyed on the question's embedding: a hit is a cached answer whose
    question is within ``threshold`` cosine similarity, under the same parameters and the same
    knowledge-base version (the ``scope``). Used after an exact-match miss; it costs one embed
    call and skips retrieve and generate. Per edge process (not shared in Redis)."""

    def __init__(self, threshold: float, ttl_s: float, max_entries: int = 1000) -> None:
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, str, np.ndarray, dict]] = OrderedDict()

    def lookup(self, vector: np.ndarray, scope: str) -> tuple[dict, float] | None:
        now = time.monotonic()
        for key in [k for k, e in self._entries.items() if e[0] <= now]:
            del self._entries[key]
        same = [(k, e) for k, e in self._entries.items() if e[1] == scope]
        if not same:
            return None
        matrix = np.stack([e[2] for _, e in same])
        scores = matrix @ _unit(vector)
        best = int(np.argmax(scores))
        if float(scores[best]) < self.threshold:
            return None
        key, entry = same[best]
        self._entries.move_to_end(key)
        return entry[3], float(scores[best])

    def add(self, key: str, vector: np.ndarray, scope: str, answer: dict) -> None:
        self._entries[key] = (time.monotonic() + self.ttl_s, scope, _unit(vector), answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _unit(vector: np.ndarray) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class _Poller:
    """A value read from a stage every ``interval_s``; ``unknown`` while it cannot be read."""

    unknown: object = None

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.value = self.unknown  # nothing is cached until the first look
        self._task: asyncio.Task | None = None

    async def _read(self):
        raise NotImplementedError

    async def refresh(self):
        try:
            self.value = await self._read()
        except Exception:  # the stage is down, or (retrieve) NOT_FOUND before the first ingest
            self.value = self.unknown
        return self.value

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.refresh()
                await asyncio.sleep(self.interval_s)

        self._task = asyncio.get_running_loop().create_task(loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class KnowledgeVersion(_Poller):
    """Every collection's version as retrieve reports it (one ListCollections per poll): a
    write to a collection changes its version, so answers cached from before are not served.
    ``value`` is the edge's default collection's; ``of(name)`` any other's (-1: unknown, e.g.
    a collection that does not exist yet, so nothing is cached for it)."""

    unknown = -1

    def __init__(self, retrieve, collection: str, interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self.retrieve = retrieve
        self.collection = collection
        self.versions: dict[str, int] = {}

    @property
    def value(self) -> int:
        return self.versions.get(self.collection, self.unknown)

    @value.setter
    def value(self, version: int) -> None:
        if version == self.unknown:
            self.versions = {}
        else:
            self.versions = {**self.versions, self.collection: version}

    def of(self, collection: str) -> int:
        return self.versions.get(collection, self.unknown)

    async def refresh(self) -> int:
        try:
            listed = await self.retrieve.list_collections(timeout=2)
            self.versions = {c.name: c.version for c in listed}
        except Exception:  # retrieve is down: nothing is known, nothing is cached
            self.versions = {}
        return self.value


class ServedModel(_Poller):
    """The model generate serves: a new model (a restart with other weights) never serves the
    old model's cached answers."""

    unknown = ""

    def __init__(self, generate, interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self.generate = generate

    async def _read(self) -> str:
        return (await self.generate.info(timeout=2)).model
