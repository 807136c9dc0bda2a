"""Output paths checked before any work is done (only the standard library is imported here)."""

from __future__ import annotations

import os
from pathlib import Path

from opdkit.errors import OpdkitError

__all__ = ["check_output_dir", "write_text_atomic"]


def check_output_dir(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output directory that is a file or cannot be created; returns the path.

    ``what`` names the setting or argument in the message (``run.out_dir``, ``--out``).
    """
    p = Path(path)
    if any(len(os.fsencode(part)) > 255 for part in p.parts):
        raise OpdkitError(f"{what} '{path}': a name in it is longer than 255 bytes")
    if p.exists():
        if not p.is_dir():
            raise OpdkitError(f"{what} '{path}': exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OpdkitError(f"{what} '{path}': the directory is not writable")
        return p
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OpdkitError(f"{what} '{path}': cannot be created ('{parent}' is a file, not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OpdkitError(f"{what} '{path}': cannot be created (no permission to write in '{parent}')")
    probe = parent / f".opdkit-probe-{os.getpid()}"  # some file systems (/proc, read-only mounts) refuse anyway
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise OpdkitError(f"{what} '{path}': cannot be created in '{parent}' ({exc.strerror or exc})") from None
    return p


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a run interrupted
    mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
