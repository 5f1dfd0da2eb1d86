"""Test doubles shared by unit tests of the edge's routes (the same behaviour runs end to end
against the real stack in tests/integration)."""

from __future__ import annotations


class Recorder:
    """Every call as (method, args, kwargs); answers from ``replies`` (an exception is raised,
    a callable is called with the arguments, anything else is returned)."""

    def __init__(self, **replies) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.replies = replies

    def __getattr__(self, name: str):
        async def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            reply = self.replies.get(name)
            if isinstance(reply, Exception):
                raise reply
            return reply(*args, **kwargs) if callable(reply) else reply

        return call
