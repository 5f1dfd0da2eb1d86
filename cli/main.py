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
  ingest PATH         chunk, embed and upsert a file or folder of documents
  models list|prepare|download|join
                      models: list, build an embedding model dir from a local HF snapshot,
                      join a chunked generate model (make models-extra)
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
        from cli.launcher import main as run_main

        return run_main(rest, prog=f"ragline {command}")
    if command == "ingest":
        from cli.ingest import main as ingest_main

        return ingest_main(rest)
    if command == "models":
        from services.embed.prepare import main as models_main

        return models_main(rest)
    if command == "trace":
        from loadtest.tracereport import main as trace_main

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
        from cli.protogen import main as protos_main

        return protos_main(rest)
    if command in SERVICES:
        return importlib.import_module(SERVICES[command]).main(rest) or 0
    print(f"ragline: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
