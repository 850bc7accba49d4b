"""The `svdtune` command line: `commands` (one small function per subcommand, and the parser) and the guided `demo`."""

from .commands import main

__all__ = ["main"]
