"""The one JSONL reader: one JSON object per line, every error naming the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from opdkit.errors import OpdkitError

__all__ = ["DataError", "read_jsonl"]


class DataError(OpdkitError, ValueError):
    """A data file is missing, unreadable, or has a malformed line."""


def read_jsonl(
    path: str | Path, *, what: str = "data file", skip_bad_lines: bool = False
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of ``path``.

    Raises :class:`DataError` naming ``path`` and the line for a missing or unreadable file, bytes that are
    not UTF-8, invalid JSON or a line that is not a JSON object. ``skip_bad_lines`` skips malformed lines
    instead (for files an interrupted writer may have cut short, such as ``metrics.jsonl``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} '{path}': no such file" if not p.exists() else f"{what} '{path}': not a file")
    try:
        f = open(p, "rb")  # decoded line by line, so that a bad byte is reported at its line
    except OSError as exc:
        raise DataError(f"{what} '{path}': cannot be read ({exc.strerror or exc})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is fine
            except UnicodeDecodeError as exc:
                if skip_bad_lines:
                    continue
                raise DataError(
                    f"{path} line {lineno}: not UTF-8 text (byte {exc.start + 1} of the line); is this a binary file?"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_bad_lines:
                    continue
                raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                if skip_bad_lines:
                    continue
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
