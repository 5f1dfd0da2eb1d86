"""Reading a /chat answer into a ``Sample``: the JSON body, or the edge's Server-Sent Events.

The edge streams (``services/api/http.py`` ``sse_events`` over ``ChatPipeline.answer_stream``)::

    event: sources  data: [{"id", "score", "text", "metadata"}, ...]
    event: token    data: {"text": "..."}          one per generated piece, as it comes
    event: replace  data: {"answer", ...}          only when the finished answer failed its check
    event: done     data: {"timings_ms", "usage", "finish_reason", "cached", ...checks}
    event: error    data: {"code", "message"}      instead of done, when a stage failed

each as ``event: NAME`` and ``data: JSON`` lines ended by a blank line. TTFT is the first
``token`` event, the ITL gaps are between token events, and the usage is the ``done``
event's (``usage.cached_prompt_tokens``, the prefix-cache hit, counts as 0 when absent).
"""

from __future__ import annotations

import json

from loadtest.metrics import Sample


class SseParser:
    """Server-Sent Events, one line at a time (the WHATWG rules): ``event:`` names the event,
    ``data:`` lines are joined with newlines, a blank line dispatches, ``:`` starts a comment."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """The event this line completes, as (name, data), else None."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def flush(self) -> tuple[str, str] | None:
        """A pending event (the stream ended without its blank line), else None."""
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        return (event, "\n".join(data)) if data else None


class StreamRecorder:
    """The edge's /chat events (``sources``, ``token``..., ``replace``, ``done`` with usage and
    timings, or ``error``) into a sample's TTFT, inter-token gaps, usage and outcome."""

    def __init__(self, sample: Sample) -> None:
        self.sample = sample
        self.done = False
        self._last_token_ms: float | None = None

    def event(self, name: str, data: str, at_ms: float) -> None:
        s = self.sample
        if name == "token":
            if self._last_token_ms is None:
                s.ttft_ms = at_ms
            else:
                s.itl_ms.append(at_ms - self._last_token_ms)
            self._last_token_ms = at_ms
        elif name == "done":
            self.done = True
            record_answer(s, json.loads(data))
        elif name == "error":
            try:
                err = json.loads(data)
                s.error = str(err.get("message") or err)[:200]
            except (ValueError, AttributeError):
                s.error = data[:200] or "error event"

    def finish(self) -> None:
        if not self.done and not self.sample.error:
            self.sample.error = "the stream ended without a done event"


def record_answer(s: Sample, body: dict) -> None:
    """Usage, timings and the cache flag of an answer (a /chat body or a stream's done event)."""
    s.timings_ms = body.get("timings_ms") or {}
    s.cached = bool(body.get("cached"))
    usage = body.get("usage") or {}
    s.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    s.completion_tokens = int(usage.get("completion_tokens") or 0)
    # ragline's field; OpenAI's spelling too, so an OpenAI-shaped server is read the same
    details = usage.get("prompt_tokens_details") or {}
    cached = usage.get("cached_prompt_tokens") or details.get("cached_tokens") or 0
    s.cached_prompt_tokens = int(cached)
