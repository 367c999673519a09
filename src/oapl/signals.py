"""Stop signals: SIGTERM and SIGUSR1 stop a run as Ctrl-C does — a checkpoint, one line, an exit status.

``kill``, ``timeout``, ``docker stop``, Kubernetes and SLURM preemption send SIGTERM; SLURM's
``sbatch --signal=USR1@<seconds>`` sends SIGUSR1 that long before the end of the job's time.
:func:`handle_stop_signals` turns SIGINT, SIGTERM and SIGUSR1 into :class:`Interrupted`, a
:class:`KeyboardInterrupt`, so the run's one interrupt path serves them all: the training loop writes a
checkpoint and the ``oapl`` command exits with ``128 + the signal number`` — 130 (SIGINT), 143
(SIGTERM), 138 (SIGUSR1) — after one line naming the checkpoint.

Python runs signal handlers in the main thread, between bytecodes (a blocking wait on a lock, a queue
or ``ray.get`` is interrupted). Work that must not be cut in half — a trainer step with its counters
and metrics row, a checkpoint write — runs inside :func:`deferred`: a signal there is noted (one log
line) and takes effect when the block ends. Once a stop has begun, a repeated SIGTERM or SIGUSR1 is
ignored, so a launcher that signals twice does not cut the checkpoint write short; a second Ctrl-C
stops at once (checkpoint writes are atomic: the previous checkpoint stays whole).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any
from collections.abc import Iterator

log = logging.getLogger(__name__)

__all__ = [
    "Interrupted",
    "STOP_SIGNALS",
    "deferred",
    "exit_code",
    "handle_stop_signals",
    "install",
    "note_checkpoint",
    "reclaim",
    "restore",
    "signal_name",
    "stopping",
    "written_checkpoint",
]

#: The signals that stop a run with a checkpoint.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.previous: dict[int, Any] = {}  # our handlers are installed: the ones they replaced
        self.depth = 0  # nesting of deferred() blocks
        self.pending: int | None = None  # a signal received inside deferred(), not yet raised
        self.stopping: int | None = None  # the signal whose stop is under way
        self.checkpoint: str | None = None  # the checkpoint written on the way out
        self.received = 0  # signals handled (raised, held or ignored)


_STATE = _State()


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum: int, frame) -> None:
    s = _STATE
    s.received += 1
    if s.stopping is not None:
        if signum == signal.SIGINT:  # Ctrl-C again: the user wants out now
            raise Interrupted(signum)
        log.warning("%s received: already stopping (writing the checkpoint); ignored", _name(signum))
        return
    if s.depth > 0:
        if s.pending is None:
            s.pending = signum
            log.warning("%s received: stopping once the step or checkpoint in progress is complete", _name(signum))
        return
    s.stopping = signum
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a stop signal does not cut: one received inside it is raised when it ends."""
    s = _STATE
    s.depth += 1
    try:
        yield
    finally:
        s.depth -= 1
    if s.depth == 0 and s.pending is not None and s.stopping is None:
        signum, s.pending = s.pending, None
        s.stopping = signum
        raise Interrupted(signum)


def stopping(exc: BaseException | None = None) -> None:
    """Mark a stop as under way (an interrupt being handled): repeated SIGTERM/SIGUSR1 are ignored."""
    s = _STATE
    if not s.previous:
        return  # our handlers are not installed: nothing to mark
    if s.stopping is None:
        s.stopping = getattr(exc, "signum", signal.SIGINT)
    s.pending = None


def note_checkpoint(path: str) -> None:
    """The checkpoint written on the way out (the CLI names it)."""
    if _STATE.previous:
        _STATE.checkpoint = path


def written_checkpoint() -> str | None:
    return _STATE.checkpoint


def exit_code(exc: BaseException) -> int:
    """``128 + signum`` of the signal that stopped the run; 130 (SIGINT) for a plain KeyboardInterrupt.

    Ray turns a signal's exception raised inside ``ray.get`` into a plain ``KeyboardInterrupt``; the
    signal is then the one recorded when the stop began."""
    signum = getattr(exc, "signum", None) or _STATE.stopping or signal.SIGINT
    return 128 + int(signum)


def signal_name(exc: BaseException) -> str:
    signum = getattr(exc, "signum", None) or _STATE.stopping or signal.SIGINT
    return _name(signum)


def reclaim() -> None:
    """Put our handlers back where a library replaced them (``ray.init`` sets SIGTERM to ``sys.exit``)."""
    if _STATE.previous and threading.current_thread() is threading.main_thread():
        for sig in _STATE.previous:
            if signal.getsignal(sig) is not _handler:
                signal.signal(sig, _handler)


def install(replace: bool = True) -> bool:
    """Make SIGINT, SIGTERM and SIGUSR1 raise :class:`Interrupted` (see the module doc) until
    :func:`restore`. False (nothing done) when already installed or outside the main thread.
    ``replace=False`` (library use) leaves a signal alone when the program has its own handler for it."""
    s = _STATE
    if s.previous or threading.current_thread() is not threading.main_thread():
        return False
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    defaults = {signal.SIGINT: signal.default_int_handler}
    # an ignored signal stays ignored (a shell's background job ignores Ctrl-C: `oapl train ... &`)
    ours = [
        sig
        for sig in STOP_SIGNALS
        if previous[sig] is not signal.SIG_IGN
        and (replace or previous[sig] in (signal.SIG_DFL, defaults.get(sig, signal.SIG_DFL)))
    ]
    if not ours:
        return False
    s.reset()
    s.previous = {sig: previous[sig] for sig in ours}
    for sig in ours:
        signal.signal(sig, _handler)
    return True


def restore() -> None:
    """The handlers :func:`install` replaced, back."""
    s = _STATE
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in s.previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    s.reset()


@contextlib.contextmanager
def handle_stop_signals(replace: bool = True) -> Iterator[None]:
    """:func:`install` for the block (re-entrant: an outer block keeps its handlers)."""
    installed = install(replace)
    try:
        yield
    finally:
        if installed:
            restore()
