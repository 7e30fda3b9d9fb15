"""The one exception type users see: a single line naming the thing and what was expected."""
import difflib
import signal
from collections.abc import Iterable

# The signals that stop a run as Ctrl-C does: SIGINT (Ctrl-C) and SIGTERM (schedulers before a kill or requeue).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class UserError(Exception):
    """Bad input from the user (file, flag, folder, stage order).

    Scripts catch it at the top level, print ``error: <message>`` and exit with status 2,
    so the user reads one line instead of a traceback.
    """


def closest(value: str, names: Iterable[str]) -> str | None:
    """The name of `names` closest to a mistyped `value` (difflib's ratio at least 0.6), or None."""
    close = difflib.get_close_matches(str(value), [str(n) for n in names], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(value: str, names: Iterable[str]) -> str:
    """" (did you mean 'X'?)" for the name of `names` closest to `value`, or ""."""
    name = closest(value, names)
    return f" (did you mean {name!r}?)" if name else ""


class StoppedByUser(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (`signum`) during training, after the resumable state was saved to
    `state_path`."""

    def __init__(self, state_path, signum: int = signal.SIGINT):
        super().__init__(str(state_path))
        self.state_path = state_path
        self.signum = int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: unwinds like Ctrl-C (see `raise_terminated`)."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: raise Terminated, so that the run stops as on Ctrl-C instead of dying silently."""
    raise Terminated


def stop_signal(e: KeyboardInterrupt) -> int:
    """The signal behind a stop: SIGTERM for Terminated or a StoppedByUser from SIGTERM, else SIGINT."""
    if isinstance(e, StoppedByUser):
        return e.signum
    return int(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
