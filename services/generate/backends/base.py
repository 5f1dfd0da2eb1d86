"""The backend interface and its domain types (the servicer converts protobuf to these)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # of prompt_tokens, reused from the prefix cache (not prefilled)


class Backend(ABC):
    """A loaded model. ``generate`` is blocking and runs on the engine's worker thread."""

    name: str = "base"
    model_name: str = ""
    context_length: int = 0

    @classmethod
    def from_settings(cls, path: Path, settings) -> Backend:
        """Load the model at ``path`` as ``settings`` (``GenerateSettings``) say."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from settings")

    @abstractmethod
    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[str | Finished]:
        """Yield text pieces, then one ``Finished``. ``should_stop`` is polled every token."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class BatchingBackend(Backend):
    """A backend that advances many sequences per model step (continuous batching).

    The engine's scheduler thread owns it: ``prepare`` tokenises and validates a request
    (raising ``InvalidArgument``), ``can_admit``/``admit`` give it a slot and its share of the
    KV cache, ``step`` advances every admitted sequence once and appends text pieces and a final
    ``Finished`` to each sequence's ``events``, ``release`` frees the slot (finished, cancelled
    or expired: within one step).
    """

    max_slots: int = 1

    @abstractmethod
    def prepare(self, messages: Sequence[ChatMessage], params: SamplingParams):
        """A sequence object with ``events: list`` and ``done: bool``."""

    @abstractmethod
    def can_admit(self, seq) -> bool: ...

    @abstractmethod
    def admit(self, seq) -> None: ...

    @abstractmethod
    def step(self, seqs) -> int:
        """Advance each sequence once; the number of tokens put through the model."""

    @abstractmethod
    def release(self, seq) -> None: ...

    def cache_usage(self) -> float:
        return 0.0

    def generate(self, messages, params, should_stop):
        """One request alone (no engine): prepare, admit, step until done."""
        seq = self.prepare(messages, params)
        if not self.can_admit(seq):
            raise RuntimeError("no free slot: use the engine to run requests concurrently")
        self.admit(seq)
        try:
            while not seq.done:
                if should_stop():
                    yield Finished("cancelled", 0, 0)
                    return
                self.step([seq])
                yield from seq.events
                seq.events.clear()
        finally:
            self.release(seq)
