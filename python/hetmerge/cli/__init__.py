"""The `hetmerge` command: demo, inspect, align, merge, sweep, convert, bench.

One thin file per subcommand (parse, call the library, print); the merging itself is
hetmerge.alignment / merging / evaluate / assemble. Exit codes:

    0 success   1 internal error   2 bad arguments or plan   3 missing, unreadable or unsafe file
    4 models incompatible with the plan (shapes, layer map, architecture)   130 interrupted
"""
from .main import main
from .parser import build_parser
from .ui import EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, IncompatibleError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_FILE", "EXIT_INCOMPATIBLE",
           "IncompatibleError"]
