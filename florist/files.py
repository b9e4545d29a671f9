"""Writing files so that neither a reader nor a crash ever sees half of one, and a failed write is one error.

Every file florist writes goes through ``atomic_write_bytes`` (or ``write_adapter``, which uses ``writing``): a full
disk, a file-size limit, a read-only place or a path through a file becomes a ``WriteError`` that names the path and
the reason, after the temporary file is removed. This module imports only florist.reading, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .reading import reason

# The temporary names of atomic writes: mkstemp's ".<name>.XXXXXXXX.tmp" and the ".<name>.<hex8>.tmp|old"
# directories an adapter directory is built in or moved aside to.
TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")


class WriteError(OSError):
    """A file or directory florist could not write; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str, errno: int | None = None):
        super().__init__(errno, reason)
        self.path, self.reason = os.fspath(path), reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.errno)


def failure_reason(e: BaseException) -> str:
    """Why a write failed, in one line: the system's words ("No space left on device") where there are some."""
    number = None if isinstance(e, OSError) and e.strerror else re.search(r"os error (\d+)", str(e))
    # safetensors' own error type carries the system's error number in its text
    return os.strerror(int(number[1])) if number else reason(e)


@contextlib.contextmanager
def writing(path: str | os.PathLike, *kinds: type[BaseException]) -> Iterator[None]:
    """Turn an ``OSError`` (or one of ``kinds``, e.g. safetensors' error type) raised inside into a ``WriteError``
    naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, *kinds) as e:
        raise WriteError(path, failure_reason(e), getattr(e, "errno", None)) from None


def make_directory(directory: Path, path: str | os.PathLike | None = None) -> None:
    """``mkdir -p directory``; a ``WriteError`` naming ``path`` (default: the directory) if it cannot be made."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = _nearest_existing(directory)
        why = f"{blocker} is not a directory" if blocker is not None and not blocker.is_dir() else failure_reason(e)
        raise WriteError(directory if path is None else path, why, e.errno) from None


def check_writable_place(path: str | os.PathLike) -> None:
    """Refuse at once, before any work, a ``path`` that no write could create: one under a file (``/dev/null/x``)
    or in a directory this process may not write in."""
    place = _nearest_existing(Path(path).absolute().parent)
    if place is None:
        return
    if not place.is_dir():
        raise WriteError(path, f"{place} is not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        raise WriteError(path, f"no permission to write in {place}")


def _nearest_existing(path: Path) -> Path | None:
    return next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name beside ``path``, flush it to disk, then rename: neither a reader nor a crash ever
    sees half a file, and a failed write leaves the old file (or none). The file gets the usual permissions
    (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    make_directory(path.parent, path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- what a directory holds --------------------------------------------------------------------------------------


@dataclass
class Scan:
    """A directory's entries sorted by who wrote them (paths relative to it, "/" after a directory's name)."""

    foreign: list[str] = field(default_factory=list)  # not written by florist: a user's files, any symlink
    temporary: list[Path] = field(default_factory=list)  # atomic writes a kill cut short


def scan(root: Path, written: Callable[[tuple[str, ...], bool], bool]) -> Scan:
    """Walk ``root`` without following symlinks. ``written(parts, is_dir)`` says whether florist writes an entry
    at the relative path ``parts``; the directories it accepts are walked into, foreign and temporary ones are not."""
    found = Scan()

    def walk(directory: Path, parts: tuple[str, ...]) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            here = (*parts, entry.name)
            is_dir = entry.is_dir(follow_symlinks=False)
            if entry.is_symlink() or not (is_dir or entry.is_file(follow_symlinks=False)):
                found.foreign.append("/".join(here))
            elif TEMPORARY_NAME.match(entry.name):
                found.temporary.append(Path(entry.path))
            elif not written(here, is_dir):
                found.foreign.append("/".join(here) + ("/" if is_dir else ""))
            elif is_dir:
                walk(Path(entry.path), here)

    walk(root, ())
    return found


def describe_foreign(path: str | os.PathLike, foreign: list[str], shown: int = 3) -> str:
    """ "runs/x holds 2 files florist did not write (notes.txt, data/)"."""
    names = ", ".join(foreign[:shown]) + (", ..." if len(foreign) > shown else "")
    return f"{path} holds {len(foreign)} file{'s' if len(foreign) != 1 else ''} florist did not write ({names})"
