"""What a stopped or failed run prints: the resume command, the one line of a stop or an error.

Shared by the scripts' entry (stages/cli.py) and the run in every process (stages/common.py), below both."""
from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from utils.config import STAGE_EPOCHS
from utils.errors import StoppedByUser, UserError


def report_interrupt(stage: str, signum: int) -> None:
    """The one line of a run stopped before (or outside) training: what is kept, and how to go on."""
    if STAGE_EPOCHS.get(stage, 0) == 0:  # evaluation and inference: nothing to resume
        kept = "before it finished; nothing to resume: run the same command again"
    else:
        kept = ("before a training state was saved; one saved earlier, if any, is kept "
                "(the same command with --resume continues it)")
    print(f"interrupted ({signal.Signals(signum).name}) {kept}", file=sys.stderr, flush=True)


def report_stop(e: StoppedByUser, argv: list[str] | None) -> None:
    """The one line of a run stopped during training: where the state is and the command that resumes it."""
    print(f"interrupted: the training state is saved in {Path(e.state_path).absolute()}; resume with: "
          f"{resume_command(argv)}", file=sys.stderr, flush=True)


def resume_command(argv: list[str] | None) -> str:
    """The command line of this run with --resume, quoted for a POSIX shell. Under torchrun: the
    launcher's own command line (read from /proc/<launcher pid>/cmdline), so the resumed run has the
    same processes."""
    flags = list(sys.argv[1:] if argv is None else argv)
    resume = [] if "--resume" in flags else ["--resume"]
    launcher = torchrun_command()
    if launcher is not None:
        return shlex.join([*launcher, *([] if "--resume" in launcher else resume)])
    return shlex.join([sys.executable, sys.argv[0], *flags, *resume])


def torchrun_command() -> list[str] | None:
    """The command line of the torchrun agent that started this process, or None when not under torchrun.

    Without /proc (not Linux), a torchrun line is rebuilt from the environment torchrun sets."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        words = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
        words = [w for w in words if w]
        if words:
            return words
    except OSError:
        pass
    return ["torchrun", f"--nnodes={os.environ.get('GROUP_WORLD_SIZE', '1')}",
            f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", sys.argv[0], *sys.argv[1:]]


def one_line(e: UserError) -> str:
    """The message of `e`; raised in a DataLoader worker, it arrives as that worker's traceback, ending with it."""
    lines = str(e).strip().splitlines() or [""]
    return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__qualname__}: ")
