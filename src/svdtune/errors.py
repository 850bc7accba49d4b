"""The one base class of errors that are the user's to act on (not bugs), so the CLI can tell them apart.

Errors from bad input are ValueError (or OSError for files) subclasses, as Python expects; errors that are neither,
such as a training run that diverged or a data download that failed, also derive from `UserError`. The command line
prints every one of them as a single line naming the problem and the fix, and keeps tracebacks for real bugs.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files, options or environment, explained by its message."""
