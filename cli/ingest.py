"""``ragline ingest PATH``: chunk, embed and upsert a file or folder of documents.

The stages' addresses, the collection and the chunking policy default to the edge's settings
(``ApiSettings``), so the command ingests what ``POST /documents`` would.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ragline.chunking import ChunkingPolicy
from ragline.documents import SUPPORTED_SUFFIXES
from services.api.settings import ApiSettings


def api_default(name: str):
    """The edge's default for one setting (its field default, not the environment's)."""
    return ApiSettings.model_fields[name].default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ragline ingest", description=f"Ingest {'/'.join(SUPPORTED_SUFFIXES)} documents."
    )
    p.add_argument("path", type=Path, help="a document, or a folder searched recursively")
    p.add_argument(
        "--embed",
        default=api_default("embed_address"),
        help="embed stage host:port (default: %(default)s)",
    )
    p.add_argument(
        "--retrieve",
        default=api_default("retrieve_address"),
        help="retrieve writer host:port (default: %(default)s)",
    )
    p.add_argument(
        "--collection",
        default=api_default("collection"),
        help="collection to ingest into (default: %(default)s)",
    )
    p.add_argument(
        "--sync",
        action="store_true",
        help="PATH is a folder the collection mirrors: also delete the collection's documents "
        "that no file under it has any more (ids are paths relative to PATH), including "
        "documents added over HTTP",
    )
    p.add_argument(
        "--chunk-words",
        type=int,
        default=api_default("chunk_words"),
        help="chunk size in words (default: %(default)s)",
    )
    p.add_argument(
        "--overlap-words",
        type=int,
        default=api_default("chunk_overlap_words"),
        help="overlap of consecutive chunks in words (default: %(default)s)",
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=api_default("chunk_tokens"),
        help="chunk size cap in embedding-model tokens, 0: off (default: %(default)s)",
    )
    return p


async def ingest(ns: argparse.Namespace, policy: ChunkingPolicy) -> int:
    from ragline.clients import EmbedStageClient, RetrieveStageClient
    from ragline.errors import RaglineError
    from services.api.ingest import Ingestor

    embed, retrieve = EmbedStageClient.connect(ns.embed), RetrieveStageClient.connect(ns.retrieve)
    try:
        ingestor = Ingestor(embed, retrieve, ns.collection, policy)

        def progress(i, total, result) -> None:
            bar = "#" * (30 * i // total)
            print(
                f"\r[{bar:<30}] {i}/{total} {result.status:<9} {result.document_id[:40]:<40}",
                end="",
                flush=True,
            )

        if ns.sync:
            results = await ingestor.sync(ns.path, progress)
        else:
            results = await ingestor.ingest_paths(ns.path, progress)
        count = {s: sum(r.status == s for r in results) for s in ("ingested", "unchanged")}
        chunks = sum(r.chunks for r in results if r.status == "ingested")
        line = f"\n{count['ingested']} ingested ({chunks} chunks), {count['unchanged']} unchanged"
        if ns.sync:
            deleted = [r for r in results if r.status == "deleted"]
            line += f", {len(deleted)} deleted ({sum(r.chunks for r in deleted)} chunks)"
        print(line)
        return 0
    except RaglineError as exc:  # a stage's StageError included: one line, no traceback
        print(f"\nragline ingest: {exc.message}", file=sys.stderr)
        return 2
    finally:
        await embed.close()
        await retrieve.close()


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    if not ns.path.exists():
        p.error(f"{ns.path} does not exist")
    if ns.sync and not ns.path.is_dir():
        p.error(f"--sync needs a folder (it deletes what is not in it), not a file: {ns.path}")
    try:
        policy = ChunkingPolicy(ns.chunk_words, ns.overlap_words, ns.chunk_tokens)
    except ValueError as exc:
        p.error(f"--chunk-words/--overlap-words/--chunk-tokens: {exc}")
    return asyncio.run(ingest(ns, policy))
