"""`loadtest grpc|http|sweep|monolith` (also `ragline loadtest ...` and `python -m loadtest`)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "grpc": ("loadtest.grpcload", "a gRPC load generator with ghz's flags and report formats"),
    "http": ("loadtest.httpload", "the /chat plan: concurrency, ramp-up, duration, CSV questions"),
    "sweep": ("loadtest.sweep", "concurrency levels -> table, knee, stage attribution, report"),
    "monolith": ("loadtest.monolith", "the replicated-monolith baseline (one instance)"),
}

USAGE = "usage: loadtest <command> [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"loadtest: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
