"""`python -m inlaid.http ...`: the front's process (what `inlaid serve` starts)."""

import argparse
import sys

from inlaid.http.cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m inlaid.http", description="Inlaid's OpenAI-compatible HTTP front")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
