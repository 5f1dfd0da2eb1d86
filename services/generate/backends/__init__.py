"""Generation backends: a registry of names to classes, imported on first use so CUDA-only
imports stay optional. A backend builds itself from the stage's settings (``from_settings``)."""

from __future__ import annotations

import importlib

from services.generate.backends.base import Backend

__all__ = ["BACKENDS", "Backend", "backend_class", "load_backend"]

# name -> (module, class); the settings' ``backend`` choices are these names.
BACKENDS: dict[str, tuple[str, str]] = {
    "llamacpp": ("services.generate.backends.llamacpp", "LlamaCppBackend"),
    "exllamav2": ("services.generate.backends.exllamav2", "ExLlamaV2Backend"),
}


def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module), cls)


def load_backend(settings) -> Backend:
    """The backend ``settings.backend`` names, loaded with ``settings.model`` (a path or an
    installed package's model, see ``ragline.models``)."""
    from ragline.models import resolve_generate_model

    return backend_class(settings.backend).from_settings(
        resolve_generate_model(settings.model), settings
    )
