"""The regular expressions users give for module and parameter names (`targets`, `train_also`), checked and bounded.

Python's `re` has no time limit, and a pattern with nested repetition (`(a+)+$`, say) backtracks exponentially on a
name it almost matches: `adapt` would hang without a word. Patterns here are compiled by the `regex` package (a
dependency of transformers, `re`-compatible syntax) and every search runs under a time limit far above what any
sane pattern needs on a module name, so a runaway pattern is an error naming it, not a hang.
"""

from __future__ import annotations

import functools

import regex

SEARCH_SECONDS = 1.0


class PatternError(ValueError):
    """A name pattern is not a valid regular expression, or is too slow to match (catastrophic backtracking)."""


@functools.lru_cache(maxsize=64)
def compile_pattern(pattern: str, option: str = "targets") -> regex.Pattern:
    """`pattern` compiled, or a PatternError saying which option holds an invalid expression."""
    if not isinstance(pattern, str):
        raise PatternError(f"{option}={pattern!r} must be a regular expression (a string)")
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise PatternError(f"{option}={pattern!r} is not a valid regular expression: {e}") from None


def search(pattern: str, name: str, option: str = "targets") -> bool:
    """Whether `pattern` occurs in `name` (like `re.search`), bounded in time."""
    try:
        return compile_pattern(pattern, option).search(name, timeout=SEARCH_SECONDS) is not None
    except TimeoutError:
        raise PatternError(f"{option}={pattern!r} takes more than {SEARCH_SECONDS:g} s to match the name {name!r} "
                           "(nested repetition such as (a+)+ backtracks exponentially); simplify the pattern") from None
