"""The ``ragline`` command: run the embedded stack, ingest documents, run one service."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from pathlib import Path

SERVICES = {
    "embed": "services.embed.__main__",
    "retrieve": "services.retrieve.__main__",
    "generate": "services.generate.__main__",
    "api": "services.api.__main__",
}

USAGE = """ragline <command> [options]

commands:
  run                 start all four services locally, ingest the sample corpus, serve /chat
  up --replicas embed=2,retrieve=2,api=1
                      the same with replicas per stage (the compose topology as processes)
  ingest PATH         chunk, embed and upsert a file or folder of .txt/.md documents
  models list|prepare|download
                      embedding models: list, build a model dir from a local HF snapshot
  embed|retrieve|generate|api [flags]
                      run one service in the foreground (same flags as python -m services.X)
  trace report FILES  per-stage latency attribution of /chat from recorded spans
  loadtest grpc|http|sweep|monolith
                      load tools: ghz-compatible gRPC load, the /chat plan, the sweep report
  protos              regenerate the gRPC stubs in ragline/v1 from protos/
  health ADDRESS [SERVICE]
                      exit 0 when a stage reports SERVING (container health checks)
  settings            print every service's settings as Markdown (the README's tables)

'ragline <command> --help' shows each command's options."""


def ingest_main(argv: list[str]) -> int:
    from ragline.chunking import ChunkingPolicy
    from ragline.clients import EmbedClient, RetrieveClient
    from ragline.errors import RaglineError
    from ragline.ingest import Ingestor

    p = argparse.ArgumentParser(prog="ragline ingest", description="Ingest .txt/.md documents.")
    p.add_argument("path", type=Path)
    p.add_argument("--embed", default="127.0.0.1:50051", help="embed stage host:port")
    p.add_argument("--retrieve", default="127.0.0.1:50052", help="retrieve stage host:port")
    p.add_argument("--collection", default="default")
    p.add_argument("--chunk-words", type=int, default=160)
    p.add_argument("--overlap-words", type=int, default=30)
    ns = p.parse_args(argv)
    if not ns.path.exists():
        p.error(f"{ns.path} does not exist")

    async def run() -> int:
        embed, retrieve = EmbedClient(ns.embed), RetrieveClient(ns.retrieve)
        try:
            ingestor = Ingestor(
                embed, retrieve, ns.collection, ChunkingPolicy(ns.chunk_words, ns.overlap_words)
            )

            def progress(i, total, result) -> None:
                bar = "#" * (30 * i // total)
                print(
                    f"\r[{bar:<30}] {i}/{total} {result.status:<9} {result.document_id[:40]:<40}",
                    end="",
                    flush=True,
                )

            results = await ingestor.ingest_paths(ns.path, progress)
            ingested = sum(r.status == "ingested" for r in results)
            chunks = sum(r.chunks for r in results if r.status == "ingested")
            print(f"\n{ingested} ingested ({chunks} chunks), {len(results) - ingested} unchanged")
            return 0
        except RaglineError as exc:
            print(f"\nragline ingest: {exc.message}", file=sys.stderr)
            return 2
        finally:
            await embed.close()
            await retrieve.close()

    import grpc

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        print(f"\nragline ingest: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def health_main(argv: list[str]) -> int:
    from ragline.clients import wait_for_serving

    p = argparse.ArgumentParser(prog="ragline health", description="gRPC health check")
    p.add_argument("address", help="host:port of a stage")
    p.add_argument("service", nargs="?", default="", help="e.g. ragline.v1.Embed")
    p.add_argument("--timeout", type=float, default=3.0)
    ns = p.parse_args(argv)
    try:
        asyncio.run(wait_for_serving(ns.address, ns.service, timeout=ns.timeout))
    except TimeoutError as exc:
        print(f"ragline health: {exc}", file=sys.stderr)
        return 1
    return 0


def settings_markdown() -> str:
    from ragline.config import markdown_table
    from services.api.settings import ApiSettings
    from services.embed.settings import EmbedSettings
    from services.generate.settings import GenerateSettings
    from services.retrieve.settings import RetrieveSettings

    sections = [
        ("api (`python -m services.api`, `ragline api`)", ApiSettings, ""),
        (
            "embed (`python -m services.embed`, `ragline embed`)",
            EmbedSettings,
            "`--data-dir` defaults to `$RAGLINE_DATA_DIR`, else `~/.local/share/ragline`.",
        ),
        (
            "retrieve (`python -m services.retrieve`, `ragline retrieve`)",
            RetrieveSettings,
            "`--data-dir` defaults to `$RAGLINE_DATA_DIR/retrieve`.",
        ),
        ("generate (`python -m services.generate`, `ragline generate`)", GenerateSettings, ""),
    ]
    return "\n".join(
        f"### {title}\n\n{markdown_table(cls)}\n" + (f"\n{note}\n" if note else "")
        for title, cls, note in sections
    ).rstrip()


def write_readme_settings(readme: Path) -> int:
    text = readme.read_text()
    start = text.index("<!-- settings:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- settings:end -->")
    readme.write_text(text[:start] + settings_markdown() + "\n" + text[end:])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("run", "up"):
        from ragline.launcher import main as run_main

        return run_main(rest, prog=f"ragline {command}")
    if command == "ingest":
        return ingest_main(rest)
    if command == "models":
        from services.embed.prepare import main as models_main

        return models_main(rest)
    if command == "trace":
        from ragline.tracereport import main as trace_main

        return trace_main(rest)
    if command == "loadtest":
        from loadtest.cli import main as loadtest_main

        return loadtest_main(rest)
    if command == "health":
        return health_main(rest)
    if command == "settings":
        if rest[:1] == ["--readme"] and len(rest) == 2:
            return write_readme_settings(Path(rest[1]))
        print(settings_markdown())
        return 0
    if command == "protos":
        from ragline.protogen import main as protos_main

        return protos_main(rest)
    if command in SERVICES:
        return importlib.import_module(SERVICES[command]).main(rest) or 0
    print(f"ragline: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
