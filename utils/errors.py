"""The one exception type users see: a single line naming the thing and what was expected."""
import signal

# The signals that stop a run as Ctrl-C does: SIGINT (Ctrl-C) and SIGTERM (schedulers before a kill or requeue).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class UserError(Exception):
    """Bad input from the user (file, flag, folder, stage order).

    Scripts catch it at the top level, print ``error: <message>`` and exit with status 2,
    so the user reads one line instead of a traceback.
    """


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
