"""User errors: mistakes the user can fix, reported by the CLI as one line ``oapl: <what>: <why>``.

Raise :class:`UserError` (or a subclass: ``ConfigError``, ``DatasetError``, ``RunDirError``, ...) for
anything a user can fix by changing a field, a file or a command-line flag. The message names the
field (``model.name``, ``task.reward``), the file and the row where they apply. The ``oapl``
command prints it on one line and exits with status 2; the traceback only with ``--debug`` (or
``OAPL_DEBUG=1``). Anything else is a bug and keeps its traceback.

Library code also follows the convention that a ``ValueError`` or ``RuntimeError`` whose message
starts with a config field (``task.dataset is required ...``, ``offline.data: ...``) is about user input: :func:`user_message`
treats those as user errors too.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(ValueError):
    """A problem with the user's input (config, files, flags); the message says what to fix."""


class RunDirError(UserError):
    """The output directory cannot be used as asked (not empty, not writable)."""


class ModelNotFoundError(UserError):
    """``model.name`` (or ``--model``) names nothing that can be loaded here."""


#: Top-level config sections: a ValueError message starting with ``<section>.`` names a field.
CONFIG_SECTIONS = (
    "model",
    "sampling",
    "engine",
    "task",
    "algorithm",
    "rollout",
    "optim",
    "eval",
    "logging",
    "checkpoint",
    "distributed",
    "offline",
    "output_dir",
    "seed",
    "steps",
    "threads",
    "base",
    "lag_sweep",
    "seeds",
)
_FIELD_PREFIX = re.compile(r"^(" + "|".join(CONFIG_SECTIONS) + r")(\.[A-Za-z_][\w.]*)?[:\s=]")

#: errno values that mean "the user's file system input is wrong", not "oapl has a bug".
_USER_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


class DiskFullError(UserError):
    """A write failed for want of space (ENOSPC, a quota, a file-size limit); the message names the path,
    the space there and what the write needed (``needed``: settable by a caller that knows it better)."""

    def __init__(
        self, what: str, target: str, where: str, needed: int | None = None, written: int | None = None
    ) -> None:
        super().__init__(what)
        self.what, self.target, self.where, self.needed, self.written = what, target, where, needed, written

    def __reduce__(self):  # across processes (Ray trainer ranks) with all its fields
        return type(self), (self.what, self.target, self.where, self.needed, self.written)

    def __str__(self) -> str:
        need = (
            f"; it needs about {_size(self.needed)}"
            if self.needed
            else f"; {_size(self.written)} written before it failed"
            if self.written
            else ""
        )
        return (
            f"{self.what}: cannot write {self.target} ({self.where}){need}; free space or write elsewhere "
            f"(output_dir), then run again (with --resume to continue from the last checkpoint)"
        )


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# the same faults as other writers report them: safetensors (Rust "os error N"), torch's zip writer
_DISK_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|File too large|os error (28|122|27)\b|"
    r"failed writing file",
    re.I,
)


def _disk_errno(exc: BaseException | None) -> int | None:
    """ENOSPC / EDQUOT / EFBIG (0 when only the message says so) if ``exc`` or what caused it is a
    failed write for want of space; else ``None``."""
    seen = 0
    while exc is not None and seen < 6:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return exc.errno
        m = _DISK_TEXT.search(str(exc))
        if m:
            text = m.group(0).lower()
            if "28" in text or "no space" in text:
                return errno.ENOSPC
            if "122" in text or "quota" in text:
                return errno.EDQUOT
            if "27" in text or "too large" in text:
                return errno.EFBIG
            return 0
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


#: a write that fails where less than this is free failed for want of space, whatever the writer says
#: (torch's zip writer reports a full disk as "basic_ios::clear: iostream error" / "unexpected pos")
NEARLY_FULL_BYTES = 1 << 20


def disk_full_error(
    exc: BaseException,
    path: str | os.PathLike[str],
    needed: int | None = None,
    written: int | None = None,
    probe: bool = False,
) -> DiskFullError | None:
    """The one-line :class:`DiskFullError` for ``exc`` when it is a write that failed for want of space
    at ``path`` (else ``None``): the free space there, the file-size limit when one applies, and
    ``needed`` (an estimate of what the write needs) or ``written`` (what it had written).

    ``probe``: ``exc`` is known to come from writing ``path``; a failure whose text names no errno
    counts as a full disk when less than :data:`NEARLY_FULL_BYTES` is free there."""
    import shutil

    code = _disk_errno(exc)
    if code is None and probe:
        where = os.path.abspath(os.fsdecode(path))
        while not os.path.exists(where) and os.path.dirname(where) != where:
            where = os.path.dirname(where)
        try:
            if shutil.disk_usage(where).free < NEARLY_FULL_BYTES:
                code = errno.ENOSPC
        except OSError:
            pass
    if code is None:
        return None

    target = os.path.abspath(os.fsdecode(path))
    where = target
    while where and not os.path.exists(where):
        parent = os.path.dirname(where)
        if parent == where:
            break
        where = parent
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free on {where}"
    except OSError:
        free = f"free space at {where} unknown"
    limit = ""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            limit = f"; the file-size limit (ulimit -f) is {_size(soft)}"
    except (ImportError, OSError, ValueError):
        pass
    what = {errno.EFBIG: "file too large", errno.EDQUOT: "disk quota exceeded"}.get(code, "disk full")
    return DiskFullError(what, target, free + limit, needed=needed, written=written)


def debug_enabled(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line or ``OAPL_DEBUG`` set to something other than 0/empty."""
    if argv is not None and "--debug" in argv:
        return True
    return os.environ.get("OAPL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text else text


def _hub_message(exc: BaseException) -> str | None:
    """One line for the Hugging Face Hub / datasets errors a wrong name or no network produces."""
    name = type(exc).__name__
    mod = type(exc).__module__ or ""
    if not (
        mod.startswith(("huggingface_hub", "datasets", "httpx", "requests", "urllib3"))
        or name in ("HFValidationError", "DatasetNotFoundError")
    ):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if name in ("RepositoryNotFoundError", "DatasetNotFoundError"):
        return f"not found on the Hugging Face Hub (or private/gated: log in with `hf auth login`): {first}"
    if name == "GatedRepoError":
        return f"gated on the Hugging Face Hub: accept its terms on the Hub page and log in: {first}"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return f"not available offline ({first}); download it first, or unset HF_HUB_OFFLINE, or use a local path"
    if name == "HFValidationError":
        return f"not an existing local path nor a valid Hugging Face Hub name: {first}"
    if "Connect" in name or "Timeout" in name or "Network" in name:
        return f"cannot reach the Hugging Face Hub ({first}); use a local path or the offline cache (HF_HUB_OFFLINE=1)"
    return None


def user_message(exc: BaseException) -> str | None:
    """The one-line message for ``exc`` if it is a user error, else ``None`` (a bug: keep the traceback)."""
    if isinstance(exc, UserError):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS and exc.filename is not None:
        return str(disk_full_error(exc, exc.filename))
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS and exc.filename is not None:
        target = os.fsdecode(exc.filename)
        if exc.filename2 is not None:
            target += f" -> {os.fsdecode(exc.filename2)}"
        return f"{target}: {exc.strerror or os.strerror(exc.errno)}"
    if (
        isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))
        and exc.errno is None
    ):
        return _one_line(str(exc))  # raised by oapl with a message that names the file
    hub = _hub_message(exc)
    if hub is not None:
        return hub
    if isinstance(exc, (ValueError, RuntimeError)) and _FIELD_PREFIX.match(str(exc)):
        return _one_line(str(exc))
    cause = exc.__cause__
    if isinstance(exc, RuntimeError) and isinstance(cause, UserError):
        # "the rollout worker failed" from a reward that cannot run / errors on most completions
        return f"{_one_line(str(exc))}: {_one_line(str(cause))}"
    return None
