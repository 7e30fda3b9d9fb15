"""Stop requests during training: what SIGINT and SIGTERM do while a stage's loop runs.

The first stop signal only sets a flag that the loop (stages/trainer.py) checks between steps; while
nothing is left to save (the epoch-end validation, after the state of that epoch end was saved) it raises
at once instead. In a single process a second SIGINT stops at once; under torchrun or --gpu spawning the
launcher forwards the signal it got, so a repeat is expected and ignored there (the launcher's own kill
timeout is the hard stop). The last saved state stays whole either way, since every save is atomic.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from utils.distributed import in_launched_worker
from utils.errors import STOP_SIGNALS


class StopRequest:
    """What the signal handler tells the loop: whether a stop was requested, and by which signal."""
    requested = False
    signum = signal.SIGINT  # the first stop signal received
    raises = False          # set while nothing is left to save (validation): the first stop raises at once

    @contextlib.contextmanager
    def raising_at_once(self) -> Iterator[None]:
        """While inside, the first stop signal raises StopDuringValidation instead of waiting for the loop."""
        self.raises = True
        try:
            yield
        finally:
            self.raises = False


class StopDuringValidation(BaseException):
    """A stop signal during the epoch-end validation (the state was saved before it); like KeyboardInterrupt,
    not an Exception, so that no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """While inside: the first SIGINT or SIGTERM only sets `requested` (checked between steps). A
    second Ctrl-C (SIGINT) raises KeyboardInterrupt at once, except in a process of a launcher (torchrun,
    --gpu spawning), which forwards the signal it got itself. A repeated SIGTERM is ignored: schedulers
    send it more than once (SLURM signals every process of a requeued job, and a batch script may forward
    its own), and a kill follows anyway if the save is late. Once a stop was requested, the state is saved
    and the process is on its way out: stop signals stay ignored after the loop, so that a late copy (a
    launcher forwarding the signal its ranks already got) cannot raise in the middle of the exit. Outside
    the main thread, signals stay as they are."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    repeat_stops = not in_launched_worker()

    def on_signal(signum: int, frame: object) -> None:
        if stop.requested:
            if repeat_stops and signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop.requested, stop.signum = True, signum
        if stop.raises:
            raise StopDuringValidation

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if stop.requested else handler)
