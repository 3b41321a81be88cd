"""`inlaid serve --config FILE`: run the coordinator (which starts its executor)."""

from __future__ import annotations

import argparse
import asyncio
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="server TOML file (see docs/serving.md)")
    parser.add_argument("--log-level", default=None, help="override server.log_level (DEBUG, INFO, ...)")
    parser.add_argument("--log-format", choices=["json", "text"], default=None, help="override server.log_format")


def run(args: argparse.Namespace) -> int:
    from inlaid.serve.config import ConfigError, load_config
    from inlaid.serve.logs import setup_logging

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"inlaid serve: {error}", file=sys.stderr)
        return 2
    if args.log_level:
        config.log_level = args.log_level.upper()
    if args.log_format:
        config.log_format = args.log_format
    setup_logging(config.log_level, config.log_format)
    return serve(config)


def serve(config) -> int:  # type: ignore[no-untyped-def]
    """Run a server until SIGTERM/SIGINT; returns the process exit code."""
    import logging

    from inlaid.engine.config import ModelLoadError
    from inlaid.serve.config import load_policy
    from inlaid.serve.coordinator import Coordinator

    async def main() -> int:
        try:
            coordinator = Coordinator(config, policy=load_policy(config.policy, config.scheduler))
        except (ModelLoadError, ValueError) as error:
            logging.getLogger("inlaid.coordinator").critical("cannot start", extra={"error": str(error)})
            return 2
        return await coordinator.run()

    try:
        import uvloop
    except ImportError:  # uvloop is optional (the `serve` extra); asyncio works, slower
        return asyncio.run(main())
    return uvloop.run(main())
