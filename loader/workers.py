"""DataLoader worker processes that ignore the stop signals from their first instruction, and are the only
processes the exit hook kills.

SIGINT and SIGTERM (a scheduler, or Ctrl-C, signals every process of the job) stop the main process, which
finishes the step in progress and still needs its batches; the workers end with the main process. A worker
is started with the stop signals blocked (a mask is inherited through fork and kept across exec), ignores
them in its init and then unblocks them: no signal reaches it in the gap before its init, whatever the start
method, and none is lost in the main process (it is pending there until the workers are started).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import signal
import threading
import weakref
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Iterator

from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from utils.errors import STOP_SIGNALS

_STARTED: weakref.WeakSet[BaseProcess] = weakref.WeakSet()   # every worker process our loaders made


def ignore_stop_signals(worker_id: int) -> None:
    """Worker init: ignore SIGINT and SIGTERM, then unblock them (blocked since the worker was started)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _RecordingContext(BaseContext):
    """The start method in force (queues, events, processes all its own); each process made is recorded."""

    def __init__(self) -> None:
        self._base = multiprocessing.get_context()

    def get_context(self, method: str | None = None) -> BaseContext:
        return self._base.get_context(method)

    def get_start_method(self, allow_none: bool = False) -> str:
        return self._base.get_start_method(allow_none)

    def Process(self, *args: Any, **kwargs: Any) -> BaseProcess:  # noqa: N802 (multiprocessing's name)
        process = self._base.Process(*args, **kwargs)
        _STARTED.add(process)
        return process


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Processes started inside begin with SIGINT and SIGTERM blocked; one that arrives here meanwhile is
    delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _WorkersEndOnError(_MultiProcessingDataLoaderIter):
    """torch's iterator over worker processes, which shuts its workers down as soon as a batch raises (a
    worker's error, re-raised here). Otherwise the workers would live on as long as the traceback that holds
    the iterator, and the garbage collection that finally ends them waits on each (seconds, at a random later
    moment of a Python session that caught the error)."""

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except StopIteration:
            raise
        except Exception:
            self._shutdown_workers()
            raise


class WorkerLoader(DataLoader):
    """A DataLoader whose workers ignore the stop signals from birth, end when a batch raises, and are killed
    at exit if still alive."""

    def __iter__(self):
        with _stop_signals_blocked():   # the workers start here
            return super().__iter__()

    def _get_iterator(self) -> _WorkersEndOnError:
        self.check_worker_number_rationality()
        return _WorkersEndOnError(self)


def _kill_workers_left() -> None:
    """At exit, multiprocessing ends the daemonic children still alive (workers of a loader never shut down,
    e.g. one a traceback keeps) with SIGTERM and then waits for them: ours ignore SIGTERM, so that wait would
    last forever. Kill them first (atexit runs this before it); other processes (a user's Pool) are left to
    multiprocessing. torch's SIGCHLD handler, which reports a worker's death mid-epoch, is reset first: these
    deaths are ours, and it would print a RuntimeError at exit."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child in _STARTED:
            child.kill()


@functools.cache
def _kill_workers_at_exit() -> None:
    atexit.register(_kill_workers_left)


def worker_loader(dataset: Dataset, num_workers: int, **loader_args: Any) -> DataLoader:
    """`DataLoader(dataset, num_workers=num_workers, **loader_args)` whose workers ignore the stop signals."""
    if num_workers == 0:
        return DataLoader(dataset, num_workers=0, **loader_args)
    _kill_workers_at_exit()
    return WorkerLoader(dataset, num_workers=num_workers, multiprocessing_context=_RecordingContext(),
                        worker_init_fn=ignore_stop_signals, **loader_args)
