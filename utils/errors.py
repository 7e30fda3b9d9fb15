"""The one exception type users see: a single line naming the thing and what was expected."""


class UserError(Exception):
    """Bad input from the user (file, flag, folder, stage order).

    Scripts catch it at the top level, print ``error: <message>`` and exit with status 2,
    so the user reads one line instead of a traceback.
    """


class StoppedByUser(KeyboardInterrupt):
    """Ctrl-C during training, after the resumable state was saved to `state_path`."""

    def __init__(self, state_path):
        super().__init__(str(state_path))
        self.state_path = state_path
