"""Atomic outputs: a file or a folder appears whole, with the umask's mode, or not at all."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


from .read import CheckpointError



@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file next to `path`; on success fsync it and rename it over `path`.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is left
    as it was. Same folder, so the rename is atomic on POSIX and Windows (os.replace).
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"{p}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates 0600; a plain open() would give 0666 & ~umask, which is what users expect
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask: from /proc on Linux (read-only), else by setting and restoring it (POSIX has
    no read-only call; the swap is process-wide, hence the /proc path first)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable_dir(path: str | os.PathLike, owned_names=frozenset(), replace_any: bool = False) -> Path:
    """Raise CheckpointError unless atomic_dir(path, owned_names) may replace `path`; returns its parent.
    replace_any: the caller was told to overwrite (e.g. save_hf(overwrite=True)): any folder may go."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"{p}: folder {folder} does not exist")
    if p.exists() or p.is_symlink():
        if not p.is_dir() or p.is_symlink():
            raise CheckpointError(f"{p}: exists and is not a folder; choose another output folder")
        foreign = [] if replace_any else sorted(c.name for c in p.iterdir()
                                                 if c.name not in owned_names or not c.is_file())
        if foreign:
            raise CheckpointError(f"{p}: exists and holds files this command did not write "
                                  f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); the whole "
                                  "folder is replaced on success, so choose an empty or new folder")
    return folder


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, owned_names: set[str] | frozenset = frozenset(), replace_any: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole.

    An interrupted run leaves either the previous folder or the complete new one, never a mix. An
    existing `path` is replaced only at the very end, and only when it holds nothing but files named
    in `owned_names` (a previous run's outputs): a folder with anything else is refused, not deleted
    (unless `replace_any`).
    """
    import shutil

    p = Path(path)
    folder = check_replaceable_dir(p, owned_names, replace_any)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp makes 0700
        yield tmp
        if p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".old", dir=folder))
            os.replace(p, old / "d")      # two renames: POSIX cannot swap a non-empty folder in one
            os.replace(tmp, p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
