"""`hetmerge fuse TARGET_DIR SOURCE_BASE:SOURCE_FT ... --calib TEXT_OR_IDS --rank R -o ADAPTER_DIR`: a thin
wrapper over hm.fuse (HeteroFusion, docs/fusion.md). SOURCE_FT is a Hugging Face directory of the
fine-tuned source or a PEFT adapter directory of SOURCE_BASE. The adapter is written in PEFT's format."""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from .outputs import check_output
from .parser_common import EPILOG, common_args
from .ui import EXIT_OK, UI, IncompatibleError

__all__ = ["cmd_fuse", "add_parser", "parse_calib"]

_IDS = re.compile(r"[\d\s,;]+")


def add_parser(sub) -> None:
    f = sub.add_parser("fuse", help="transfer task updates of LMs of other families into TARGET as a PEFT LoRA "
                       "adapter (HeteroFusion)",
                       description="Match the sources' blocks and projections to the target's by role and "
                       "relative depth (or CKA), fit latent-basis maps on calibration tokens or text, map each "
                       "source's task update (fine-tuned minus base, or a LoRA adapter) into the target's basis, "
                       "denoise conflicting sources, truncate to rank R and write a PEFT LoRA adapter. docs/fusion.md",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("target", metavar="TARGET_DIR", help="Hugging Face directory of the target model")
    f.add_argument("sources", nargs="+", metavar="SOURCE_BASE:SOURCE_FT",
                   help="a source's base directory and its fine-tuned directory or PEFT adapter directory")
    f.add_argument("--calib", required=True, metavar="TEXT_OR_IDS",
                   help="calibration: token ids that every model shares ('5,9,2;7,1,3': sequences separated by "
                   "';'), or a text file, or text: each model encodes text with the tokenizer in its own "
                   "directory, and activations pair by character spans (tokenizers may differ)")
    f.add_argument("--calib-length", type=int, default=64, metavar="T",
                   help="most tokens of any model per calibration pass when --calib is text (default: %(default)s)")
    f.add_argument("--calib-pool", choices=["last", "mean"], default="last",
                   help="text calibration: the activation of a character span is its last token's or the mean "
                   "of its tokens' (default: %(default)s)")
    f.add_argument("--blocks", choices=["depth", "cka"], default="depth",
                   help="pair blocks by relative depth, or by linear CKA of their outputs on the calibration "
                   "set, depth order kept (default: %(default)s)")
    f.add_argument("--rank", type=int, required=True, metavar="R", help="LoRA rank of the adapter")
    f.add_argument("--basis", choices=["lstsq", "procrustes", "permutation"], default="procrustes",
                   help="latent-basis maps (default: %(default)s)")
    f.add_argument("--density", type=float, default=1.0, help="TIES trim: share of entries kept per update "
                   "(default: %(default)s)")
    f.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of the source weights "
                   "from their agreement (default: %(default)s)")
    f.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR", help="adapter folder to write")
    f.add_argument("--force", action="store_true", help="replace ADAPTER_DIR when it exists")
    common_args(f)
    f.set_defaults(func=cmd_fuse)


def parse_calib(text: str):
    """Token ids [B, T] from ids ('1,2,3;4,5,6'); otherwise the text (of the file, when it names one),
    which hm.fuse encodes with each model's own tokenizer."""
    import torch

    if _IDS.fullmatch(text) and re.search(r"\d", text):
        rows = [[int(t) for t in re.split(r"[\s,]+", r.strip()) if t] for r in text.split(";") if r.strip()]
        if len({len(r) for r in rows}) != 1:
            raise IncompatibleError(f"--calib: id sequences must have one length, got {[len(r) for r in rows]}")
        return torch.tensor(rows, dtype=torch.long)
    try:
        is_file = len(text) < 4096 and Path(text).is_file()
    except OSError:      # text longer than a file name can be (ENAMETOOLONG): it is text
        is_file = False
    if is_file:
        text = Path(text).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise IncompatibleError("--calib: the calibration text is empty")
    return text


def cmd_fuse(args, ui: UI) -> int:
    from ..fusion import FusionError, fuse

    if args.rank < 1:
        raise IncompatibleError(f"--rank must be >= 1, got {args.rank}")
    if args.calib_length < 2:
        raise IncompatibleError(f"--calib-length must be >= 2, got {args.calib_length}")
    target, out = Path(args.target), Path(args.output)
    pairs = []
    for s in args.sources:
        base, sep, ft = s.rpartition(":")
        if not sep or not base or not ft:
            raise IncompatibleError(f"source {s!r}: expected SOURCE_BASE:SOURCE_FT")
        pairs.append((Path(base), Path(ft)))
    for p in [target] + [x for pr in pairs for x in pr]:
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such model or adapter directory")
    ins = [("target", target)] + [(f"source {k} {w}", p) for k, pr in enumerate(pairs)
                                  for w, p in zip(("base", "fine-tuned"), pr)]
    check_output(out, ins, "output", folder=True)
    if out.exists() and not args.force:
        from ..checkpoint import CheckpointError
        raise CheckpointError(f"{out}: exists; pass --force to replace it")
    calib = parse_calib(args.calib)
    t0 = time.perf_counter()
    try:
        res = fuse(str(target), [(str(b), str(f)) for b, f in pairs], calib, rank=args.rank, basis=args.basis,
                   density=args.density, temperature=args.temperature, output=out, overwrite=args.force,
                   blocks=args.blocks, calib_length=args.calib_length, calib_pool=args.calib_pool)
    except FusionError as exc:
        raise IncompatibleError(str(exc)) from exc
    what = (f"{calib.shape[0]}×{calib.shape[1]} shared calibration tokens" if not isinstance(calib, str) else
            f"{len(calib):,} characters of calibration text (each model's own tokenizer)")
    ui.out(f"fused {len(pairs)} source(s) into {target} on {what} ({args.basis} maps, "
           f"{time.perf_counter() - t0:.2f} s)")
    for k, (w, a) in enumerate(zip(res.weights.tolist(), res.agreement.tolist())):
        ui.out(f"  source {k}: weight {w:.3f}, agreement {a:+.3f}, blocks {res.pairs[k]}")
    kept = sum(res.kept_energy.values()) / max(1, len(res.kept_energy))
    ui.out(f"wrote {out}: LoRA rank {args.rank} on {len(res.deltas)} modules (mean energy kept {kept:.1%})")
    return EXIT_OK
