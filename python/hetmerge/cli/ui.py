"""What every subcommand shares for talking to the user: exit codes, the error that means "these
models cannot be merged as planned", printing under --quiet/-v, and progress bars."""
from __future__ import annotations

import sys

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FILE, EXIT_INCOMPATIBLE = 0, 1, 2, 3, 4


class IncompatibleError(ValueError):
    """The models cannot be merged as the plan says; the message says what to change."""


class UI:
    """Printing and progress bars under --quiet / -v."""

    def __init__(self, quiet: bool = False, verbose: int = 0):
        self.quiet, self.verbose = quiet, verbose

    def out(self, msg: str = "") -> None:
        if not self.quiet:
            print(msg, flush=True)

    def info(self, msg: str) -> None:   # -v only, on stderr so stdout stays the report
        if self.verbose and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"hetmerge: warning: {msg}", file=sys.stderr, flush=True)

    def bar(self, **kw):
        """A tqdm bar on stderr, or a no-op stand-in under --quiet / without tqdm."""
        if self.quiet:
            return NoBar()
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return NoBar()
        return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)

    @property
    def bar_factory(self):
        return None if self.quiet else (lambda **kw: self.bar(**kw))


class NoBar:
    def update(self, n=1): pass
    def set_postfix_str(self, s): pass
    def set_description(self, s): pass
    def close(self): pass
    def __enter__(self): return self
    def __exit__(self, *a): return False


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
