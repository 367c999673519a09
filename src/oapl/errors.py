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
CONFIG_SECTIONS = ("model", "sampling", "engine", "task", "algorithm", "rollout", "optim", "eval",
                   "logging", "checkpoint", "distributed", "offline", "output_dir", "seed", "steps",
                   "threads", "base", "lag_sweep", "seeds")
_FIELD_PREFIX = re.compile(r"^(%s)(\.[A-Za-z_][\w.]*)?[:\s=]" % "|".join(CONFIG_SECTIONS))

#: errno values that mean "the user's file system input is wrong", not "oapl has a bug".
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ENAMETOOLONG}


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
    if not (mod.startswith(("huggingface_hub", "datasets", "httpx", "requests", "urllib3")) or
            name in ("HFValidationError", "DatasetNotFoundError")):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if name in ("RepositoryNotFoundError", "DatasetNotFoundError"):
        return f"not found on the Hugging Face Hub (or private/gated: log in with `hf auth login`): {first}"
    if name == "GatedRepoError":
        return f"gated on the Hugging Face Hub: accept its terms on the Hub page and log in: {first}"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (f"not available offline ({first}); download it first, or unset HF_HUB_OFFLINE, or use a "
                f"local path")
    if name == "HFValidationError":
        return f"not an existing local path nor a valid Hugging Face Hub name: {first}"
    if "Connect" in name or "Timeout" in name or "Network" in name:
        return f"cannot reach the Hugging Face Hub ({first}); use a local path or the offline cache (HF_HUB_OFFLINE=1)"
    return None


def user_message(exc: BaseException) -> str | None:
    """The one-line message for ``exc`` if it is a user error, else ``None`` (a bug: keep the traceback)."""
    if isinstance(exc, UserError):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS and exc.filename is not None:
        target = os.fsdecode(exc.filename)
        if exc.filename2 is not None:
            target += f" -> {os.fsdecode(exc.filename2)}"
        return f"{target}: {exc.strerror or os.strerror(exc.errno)}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) and exc.errno is None:
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
