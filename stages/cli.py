"""The entry point of every stage script: flags, then the run, then the exit status.

Flags are parsed before torch is imported (the stage body is named as "module:function" and imported
afterwards), so `--help` and a bad flag answer in about a second. Exit codes: 0 done, 2 bad input
(`error: ...`), 130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM (schedulers). A run stopped
during training has saved its state and prints, once, the command that resumes it; a run stopped
before (imports, model loading) or outside training prints one line saying so. A stop that arrives
during the last step does not stop the stage: it writes its artifact, says so, and exits 0 (it has
finished; what depends on it may go on).
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import Callable

from loader.datasets_table import DATASETS
from stages.stops import one_line, report_interrupt, report_stop
from utils.config import build_parser, given_flags
from utils.errors import STOP_SIGNALS, StoppedByUser, Terminated, UserError, raise_terminated, stop_signal


def cli(stage: str, structure: str | None | Callable[[argparse.Namespace], str | None],
        body: str | Callable[..., None], argv: list[str] | None = None) -> None:
    """Parse flags, then import and launch `body` ("module:function" or the function itself) on the run.

    `structure`: "MLP", "TR", None (mediator, k-means), or a function of the parsed flags (segment_images).
    UserError becomes one line and exit 2; a stop signal exits 130 (SIGINT) or 143 (SIGTERM)."""
    parser = build_parser(stage, DATASETS)
    args = parser.parse_args(argv)
    args.stage = stage
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    _pending_stops.clear()  # a stop noted by an earlier call in this process (tests, the API) is not this run's
    previous = {s: signal.signal(s, _start_up_stop) for s in STOP_SIGNALS} if main_thread else {}
    try:
        if getattr(args, "model", None) is not None:  # segment_images.py --model: the settings come from there
            from stages.model_folder import apply_model_folder  # reads JSON with utils.io, which imports torch
            apply_model_folder(args, given_flags(parser, argv), f"{stage}.py")
        if isinstance(body, str):
            module, _, name = body.partition(":")
            body = getattr(importlib.import_module(module), name)
        from stages.common import launch_stage  # torch and the models load here, after the flags
        _raise_pending_stop()
        launch_stage(args, structure(args) if callable(structure) else structure, body, argv)
    except StoppedByUser as e:
        report_stop(e, argv)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        report_interrupt(stage, stop_signal(e))
        sys.exit(128 + stop_signal(e))
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_pending_stops: list[int] = []


def _start_up_stop(signum: int, frame: object) -> None:
    """A stop signal before training: noted, then raised as Ctrl-C (Terminated for SIGTERM). An import
    that swallows the exception (a bare `except` in a library) cannot lose it: `_raise_pending_stop`
    raises it again once the imports are done."""
    _pending_stops.append(signum)
    if signum == signal.SIGTERM:
        raise_terminated(signum, frame)
    raise KeyboardInterrupt


def _raise_pending_stop() -> None:
    if _pending_stops:
        raise Terminated if _pending_stops[0] == signal.SIGTERM else KeyboardInterrupt


def structure_flag(args: argparse.Namespace) -> str:
    """segment_images.py: --structure picks which trained head the run loads."""
    return args.structure
