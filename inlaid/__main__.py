"""`python -m inlaid ...`: the `inlaid` command (inlaid/cli.py), for an environment whose
scripts directory is not on PATH."""

import sys

from inlaid.cli import main

sys.exit(main())
