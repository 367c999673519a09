"""Atomic writes: a reader (or a resumed run) sees the old file/folder or the complete new one, never half.

Everything is written beside its final name (same file system), flushed to disk, then renamed into
place with :func:`os.replace`, which is atomic on POSIX; the directory entry is fsync'ed after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from oapl.errors import disk_full_error

__all__ = ["atomic_dir", "atomic_write", "atomic_write_text", "fsync_dir"]


def _size_of(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; 0 when gone)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def _largest_sibling(final: Path, prefix: str) -> int | None:
    """Size of the largest finished folder beside ``final`` (what writing another like it needs)."""
    try:
        sizes = [
            _size_of(p)
            for p in final.parent.iterdir()
            if p.is_dir() and p != final and not p.name.startswith((prefix, "."))
        ]
    except OSError:
        return None
    return max(sizes, default=0) or None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (after a rename) where the file system supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported (e.g. some network file systems)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: ``writer(tmp_path)``, fsync, ``os.replace``. A failure leaves no temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = _size_of(tmp)
        tmp.unlink(missing_ok=True)
        full = disk_full_error(e, path, written=written, probe=True) if isinstance(e, Exception) else None
        if full is not None:  # one line naming the file and the space, not the writer's traceback
            raise full from e
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], prefix: str = ".tmp-") -> Iterator[Path]:
    """Build a folder in a temporary sibling, then swap it in for ``final`` (replacing an old one).

    If the block raises, ``final`` is untouched and the temporary folder is removed. A process killed
    inside the block leaves a ``prefix*`` folder behind, which callers clean up by that prefix.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except Exception as e:
        # disk full (or a quota, a file-size limit): one line naming the folder, the space there and what
        # a folder like it takes (the previous one beside it, e.g. the last checkpoint); it stays intact
        full = disk_full_error(e, final, needed=_largest_sibling(final, prefix), written=_size_of(tmp), probe=True)
        if full is not None:
            raise full from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
