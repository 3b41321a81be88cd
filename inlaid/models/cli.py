"""`inlaid models prepare|path`: the default model, converted once into the cache."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["prepare", "path"])
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from inlaid.models.prepare import default_model_dir, prepare_default_model

    if args.action == "prepare":
        path = prepare_default_model(quiet=args.quiet)
        if not args.quiet:
            print(path)
    else:
        print(default_model_dir())
    return 0
