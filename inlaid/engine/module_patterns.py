"""PEFT's module-name patterns (`exclude_modules`, `layers_pattern`) read and matched safely.

PEFT matches them with `re`, which holds the interpreter lock to the end of a match: a pattern
that backtracks without end (`(.|.)*\\d{5}`: minutes a module name) froze a server's whole
coordinator from one admin call (an outside probe). The engine matches with the `regex`
package, `re`'s syntax with a time limit a match, after `check_pattern` refused what the two
read apart and what `regex` would write out huge when it compiles.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

try:  # the standard library's own parser of `re` patterns (its modules were renamed in 3.11)
    from re import _constants as re_constants, _parser as re_parser
except ImportError:  # Python 3.10
    import sre_constants as re_constants  # type: ignore[no-redef]
    import sre_parse as re_parser  # type: ignore[no-redef]

# Module names are ~35 characters: any sane pattern matches one in microseconds.
MATCH_TIMEOUT_S = 0.25
PATTERN_BUDGET_S = 0.1  # for the 21 module names an adapter's patterns are tried on when read
MAX_EXPANDED_PATTERN = 10_000


def check_pattern(pattern: str) -> None:
    """re.compile (PEFT's reader) with its FutureWarnings as errors: `re` reads `[[:digit:]]`
    as a nested set where `regex`, which the engine matches with, reads a POSIX class (a
    reviewer's pattern matched layer 1 in one and not in the other). And a bound on the
    pattern's size with its counted repeats written out, which `regex` does when it compiles:
    `(?:x{3000}){3000}`, 17 characters, took a coordinator to 2.5 GB (an outside probe), and
    `(?:x{65535}){65535}` a process to 21 GB."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        re.compile(pattern)
    if (size := _expanded_size(re_parser.parse(pattern))) > MAX_EXPANDED_PATTERN:
        raise re.error(f"its counted repeats write out to {size} items; at most {MAX_EXPANDED_PATTERN} are "
                       "allowed (a module name is ~35 characters)")


def _expanded_size(items: Any) -> int:
    """How many items a parsed pattern holds with every counted repeat written out ({n,m}: m
    copies; an open-ended repeat: its minimum, at least one)."""
    size = 0
    for op, value in items:
        if op in _REPEATS:
            low, high, inner = value
            size += max(1, low if high == re_constants.MAXREPEAT else high) * _expanded_size(inner)
        elif op == re_constants.SUBPATTERN:
            size += _expanded_size(value[-1])
        elif op in _GROUPS:  # (?>...): its items themselves
            size += _expanded_size(value)
        elif op == re_constants.BRANCH:
            size += sum(_expanded_size(branch) for branch in value[1])
        elif op in (re_constants.ASSERT, re_constants.ASSERT_NOT):
            size += _expanded_size(value[1])
        else:
            size += 1
        if size > MAX_EXPANDED_PATTERN:  # stop counting (a product of huge counts)
            return size
    return size


_REPEATS = {getattr(re_constants, name) for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
            if hasattr(re_constants, name)}
_GROUPS = {re_constants.ATOMIC_GROUP} if hasattr(re_constants, "ATOMIC_GROUP") else set()
