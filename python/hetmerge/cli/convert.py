"""`hetmerge convert`."""
from __future__ import annotations

from pathlib import Path

from .outputs import check_output
from .ui import EXIT_OK, UI


def cmd_convert(args, ui: UI) -> int:
    from ..checkpoint import CheckpointError, load_state, save_state

    out = Path(args.output)
    check_output(out, [("input", Path(args.input))])
    if (out.exists() or out.is_symlink()) and not args.force:
        raise CheckpointError(f"{out}: exists; pass --force to replace it")
    state = load_state(args.input, sub_key=args.sub_key, key_prefix=args.key_prefix)
    out = save_state(state, out, format=args.format)
    ui.out(f"wrote {out} ({len(state)} tensors)")
    return EXIT_OK
