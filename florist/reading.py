"""Reading the files florist is given: every way a read can fail becomes one error that names the file.

Each function takes the caller's error type (``DataError``, ``ReportError``, ...), so every layer keeps its own
errors, and the message always starts with the file's path::

    data/train.json: not UTF-8 text (byte 0xff at offset 12)
    run/metrics.jsonl:7: not valid JSON (Expecting ',' delimiter at column 31)
    loop/questions.json: cannot read (Too many levels of symbolic links)

Nothing here imports from florist, so any layer may use it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

ErrorType = type[Exception]


def reason(e: BaseException) -> str:
    """One line saying why an OS call or a parser failed."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def path_status(path: str | os.PathLike, error: ErrorType) -> os.stat_result | None:
    """``stat`` of ``path`` (links followed); None when nothing is there. A symbolic link loop, a directory that may
    not be searched and every other failure raises ``error``, where ``Path.exists`` would answer a misleading False."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise error(f"{path}: cannot read ({reason(e)})") from None


def path_kind(path: str | os.PathLike, error: ErrorType) -> str | None:
    """``"file"``, ``"dir"``, ``"other"`` (a FIFO, a device, a socket) or None when nothing is there."""
    status = path_status(path, error)
    if status is None:
        return None
    if stat.S_ISREG(status.st_mode):
        return "file"
    return "dir" if stat.S_ISDIR(status.st_mode) else "other"


def require_file(path: str | os.PathLike, error: ErrorType) -> None:
    """Raise ``error`` unless ``path`` is a regular file (links followed)."""
    kind = path_kind(path, error)
    if kind is None:
        raise error(f"{path}: no such file")
    if kind != "file":
        raise error(f"{path}: {'a directory' if kind == 'dir' else 'a FIFO, socket or device'}, expected a file")


def read_bytes_file(path: str | os.PathLike, error: ErrorType, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file; a missing file, a directory, a FIFO (which would block), an unreadable or an
    over-large file raises ``error``."""
    require_file(path, error)
    try:
        with open(path, "rb") as f:
            if max_bytes is not None:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    raise error(f"{path}: {size} bytes, over the limit of {max_bytes}")
            return f.read()
    except OSError as e:
        raise error(f"{path}: cannot read ({reason(e)})") from None


def decode_text(data: bytes, where: str, error: ErrorType) -> str:
    """UTF-8 text (a leading byte-order mark dropped); other bytes raise ``error`` naming the first bad one."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_text_file(path: str | os.PathLike, error: ErrorType, max_bytes: int | None = None) -> str:
    """The UTF-8 text of a regular file, every failure as ``error`` naming the file."""
    return decode_text(read_bytes_file(path, error, max_bytes), str(path), error)


def parse_json(text: str, where: str, error: ErrorType) -> Any:
    """One JSON document; broken, empty, absurdly nested or oversized-number text raises ``error``."""
    if not text.strip():
        raise error(f"{where}: empty, expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if "\n" in text.strip() else f"column {e.colno}"
        raise error(f"{where}: not valid JSON ({e.msg} at {at})") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting deeper than the stack
        raise error(f"{where}: not valid JSON ({reason(e)})") from None


def read_json_file(path: str | os.PathLike, error: ErrorType, max_bytes: int | None = None) -> Any:
    """The JSON document in a file, every failure as ``error`` naming the file."""
    return parse_json(read_text_file(path, error, max_bytes), str(path), error)


def parse_json_lines(text: str, where: str, error: ErrorType) -> list[tuple[int, Any]]:
    """(line number, document) for every non-blank line of JSON Lines text; a broken line raises ``error``
    naming ``where:line``."""
    # split at newlines only: str.splitlines would also cut at U+2028 and others, which JSON strings may hold
    lines = enumerate(text.split("\n"), 1)
    return [(n, parse_json(line, f"{where}:{n}", error)) for n, line in lines if line.strip()]


def leading_records(data: bytes, is_record: Callable[[Any], bool]) -> tuple[list[Any], int | None]:
    """The JSON Lines records of ``data`` before the first line that is not one (a line a crash cut short, or one
    ``is_record`` refuses), and that line's number (None: every line is one). For files florist appends to."""
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:  # UnicodeDecodeError included
            return records, number
        if not is_record(record):
            return records, number
        records.append(record)
    return records, None


TABLE_FORMATS = (".parquet", ".csv")


def read_table_file(path: str | os.PathLike, error: ErrorType) -> list[dict[str, Any]]:
    """The rows of a Parquet or CSV file as dicts; a file the reader cannot parse raises ``error``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise error(f"{path}: not a table file ({', '.join(TABLE_FORMATS)})")
    require_file(path, error)
    if not os.access(path, os.R_OK):
        raise error(f"{path}: cannot read (Permission denied)")
    import pyarrow

    try:
        if suffix == ".parquet":
            import pyarrow.parquet

            table = pyarrow.parquet.read_table(path)
        else:
            import pyarrow.csv

            table = pyarrow.csv.read_csv(path)
        return table.to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as e:  # ArrowInvalid is a ValueError
        raise error(f"{path}: not a valid {suffix[1:]} file ({reason(e)})") from None
