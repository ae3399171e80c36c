"""``lossd`` command line. ``lossd serve`` flags override the LOSSD_* environment variables;
``lossd sessions``, ``export`` and ``import`` talk to a running server (lossd_server.session_commands)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError

from lossd_server import __version__, demo
from lossd_server.app import serve
from lossd_server.config import Settings
from lossd_server.logs import configure_logging
from lossd_server.session_commands import Command, add_commands


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(prog="lossd", description="Loss-as-a-service for classifier training.")
    parser.add_argument("--version", action="version", version=f"lossd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the gRPC server", argument_default=argparse.SUPPRESS)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind: type = field.annotation if field.annotation in (int, float) else str  # type: ignore[assignment]
        run.add_argument(flag, dest=name, type=kind, help=f"{field.description or ''} [env LOSSD_{name.upper()}]")
    demo.add_command(commands)
    return parser, {**add_commands(commands), "demo": demo.run_demo}


def main(argv: list[str] | None = None) -> int:
    parser, handlers = _parser()
    namespace = parser.parse_args(argv)
    if namespace.command in handlers:
        return handlers[namespace.command](namespace)
    args = vars(namespace)
    command = args.pop("command")
    if command == "serve":
        try:
            settings = Settings(**args)
        except ValidationError as error:
            print(f"lossd serve: invalid settings:\n{error}", file=sys.stderr)
            return 2
        configure_logging(settings.log_level, settings.log_format)
        try:
            asyncio.run(serve(settings))
        except (OSError, ValueError) as error:
            print(f"lossd serve: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
