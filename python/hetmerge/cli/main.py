"""`hetmerge` entry point: parse, run the subcommand, turn exceptions into exit codes."""
from __future__ import annotations

import sys
import traceback

from .models import torch_setup
from .parser import build_parser
from .ui import EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_INTERNAL, EXIT_USAGE, UI, IncompatibleError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    ui = UI(quiet=args.quiet, verbose=args.verbose)
    prog = f"hetmerge {args.command}"

    def fail(code: int, msg: str) -> int:
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return code

    from ..architectures import ArchError
    from ..checkpoint import CheckpointError, UnsafeCheckpointError
    from ..data import DataError
    from ..plan import PlanError

    try:
        torch_setup(args)
        return args.func(args, ui)
    except KeyboardInterrupt:
        return fail(130, "interrupted (outputs are written atomically: nothing half-written was left)")
    except (PlanError, ArchError) as exc:
        return fail(EXIT_USAGE, str(exc))
    except UnsafeCheckpointError as exc:
        return fail(EXIT_FILE, str(exc))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        return fail(EXIT_FILE, exc.args[-1] if isinstance(exc.args[-1], str) and exc.filename is None else
                    f"{exc.filename}: {exc.strerror}")
    except CheckpointError as exc:
        return fail(EXIT_FILE, str(exc))
    except (IncompatibleError, DataError) as exc:
        return fail(EXIT_INCOMPATIBLE, str(exc))
    except Exception as exc:   # a bug or an unforeseen input: say what happened, traceback on -v
        from ..spec import SpecError
        if isinstance(exc, SpecError):
            return fail(EXIT_INCOMPATIBLE, str(exc))
        if args.verbose:
            traceback.print_exc()
        return fail(EXIT_INTERNAL, f"{type(exc).__name__}: {exc}" +
                    ("" if args.verbose else " (run with -v for the traceback; please report it)"))
