"""`inlaid models prepare|path`: the default model, converted once into the cache."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["prepare", "path"])
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from inlaid.models.prepare import default_model_dir, is_prepared, prepare_default_model

    model_dir = default_model_dir()
    if args.action == "prepare":
        if not is_prepared(model_dir):
            from inlaid.cli_args import writable_dir_problem

            # Checked before the conversion (a minute of work), which failed only at its save.
            problem = writable_dir_problem(model_dir.parent, "the model cache")
            if problem:
                print(f"inlaid models: {problem} (set XDG_CACHE_HOME to a writable directory)", file=sys.stderr)
                return 2
        path = prepare_default_model(quiet=args.quiet)
        if not args.quiet:
            print(path)
        return 0
    if not is_prepared(model_dir):
        # A path that does not exist (or holds half a model) printed with exit 0 went on to
        # fail in whatever used it.
        print(f"inlaid models: the default model is not prepared at {model_dir}: run `inlaid models prepare`",
              file=sys.stderr)
        return 1
    print(model_dir)
    return 0
