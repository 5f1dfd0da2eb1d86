"""Generation backends: one interface, loaded lazily so CUDA-only imports stay optional."""

from __future__ import annotations

from services.generate.backends.base import Backend

__all__ = ["Backend", "load_backend"]


def load_backend(name: str, **kwargs) -> Backend:
    if name == "llamacpp":
        from services.generate.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(**kwargs)
    if name == "exllamav2":
        from services.generate.backends.exllamav2 import ExLlamaV2Backend

        return ExLlamaV2Backend(**kwargs)
    raise ValueError(f"unknown backend {name!r}: use 'llamacpp' or 'exllamav2'")
