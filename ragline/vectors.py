"""Vectors cross the wire as packed little-endian float32 bytes plus a dimension."""

from __future__ import annotations

import numpy as np

from ragline.errors import InvalidArgument

_F32 = np.dtype("<f4")


def pack(vectors: np.ndarray) -> bytes:
    """Row-major little-endian float32 bytes of a 1-D or 2-D array."""
    return np.ascontiguousarray(vectors, dtype=_F32).tobytes()


def unpack(data: bytes, dimension: int, *, what: str = "vector") -> np.ndarray:
    """Parse packed float32 bytes into an ``(n, dimension)`` array, refusing malformed input."""
    if dimension <= 0:
        raise InvalidArgument(f"{what}: dimension must be positive, got {dimension}")
    if len(data) == 0:
        raise InvalidArgument(f"{what} is empty: send {dimension} float32 values (4 bytes each)")
    row_bytes = 4 * dimension
    if len(data) % row_bytes:
        raise InvalidArgument(
            f"{what} has {len(data)} bytes, not a multiple of {row_bytes} "
            f"({dimension} float32 values per vector): wrong dimension?"
        )
    arr = np.frombuffer(data, dtype=_F32).reshape(-1, dimension)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{what} contains NaN or infinite values")
    return arr.astype(np.float32, copy=False)


def normalize(arr: np.ndarray) -> np.ndarray:
    """L2-normalise rows; zero rows stay zero instead of becoming NaN."""
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)
