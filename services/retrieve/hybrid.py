"""Search modes (dense, sparse, hybrid) and the reciprocal-rank fusion of hybrid search."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from ragline.errors import InvalidArgument

# Reciprocal-rank fusion (Cormack et al., 2009): score = sum over the rankings of 1 / (k + rank).
# k = 60 is the paper's; it keeps a first place in one ranking from outweighing a strong
# showing in both.
RRF_K = 60


class SearchMode(Enum):
    """How a search ranks passages; the value is the persisted and configured name."""

    DENSE = "dense"  # cosine over the query vector (FAISS)
    SPARSE = "sparse"  # BM25 over the passages' text (SQLite FTS5)
    HYBRID = "hybrid"  # both, fused by reciprocal rank


MODES: dict[str, SearchMode] = {m.value: m for m in SearchMode}


def search_mode(name: str) -> SearchMode:
    """The mode called ``name``; ``InvalidArgument`` naming the valid ones if there is none."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise InvalidArgument(
            f"search mode must be one of {', '.join(MODES)}, got {name!r}"
        ) from None


def plan(mode: SearchMode, has_vector: bool, has_text: bool) -> tuple[SearchMode, str]:
    """The mode that runs for a request in ``mode``, and a note when it is not that one.

    Hybrid with only a vector runs dense (clients from before hybrid send no text); anything
    else missing what its mode needs is refused, saying what to send.
    """
    vector, text = "vector (the query's embedding)", "query_text (the question's text)"
    if mode is SearchMode.HYBRID and has_vector and not has_text:
        return SearchMode.DENSE, "hybrid without query_text"
    if mode is SearchMode.HYBRID and not has_vector:
        raise InvalidArgument(
            f"hybrid search needs {vector} and {text}: send both"
            if not has_text
            else f"hybrid search needs {vector} too: send it, or set mode SEARCH_MODE_SPARSE"
        )
    if mode is SearchMode.DENSE and not has_vector:
        raise InvalidArgument(
            f"dense search needs {vector}: send it, or set mode SEARCH_MODE_SPARSE with query_text"
        )
    if mode is SearchMode.SPARSE and not has_text:
        raise InvalidArgument(
            f"sparse search needs {text}: send it, or set mode SEARCH_MODE_DENSE with a vector"
        )
    return mode, ""


def candidates(top_k: int) -> int:
    """How many hits each ranking contributes to a hybrid search of ``top_k``."""
    return max(top_k * 4, 20)


def fuse(*rankings: Sequence[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """``(id, rrf score)`` over every id in ``rankings`` (each best first), best first; ties
    keep the order of first appearance (the earlier ranking, then the better rank)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])
