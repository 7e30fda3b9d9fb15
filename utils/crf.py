"""Dense CRF refinement of cluster logits (Kraehenbuehl & Koltun), and a process pool that runs it per image.

The published pipeline, reproduced step for step by `dense_crf`:
1. the caller passes ``log_softmax(3 * cos(feature, cluster_probe))`` at label size and the
   de-normalised uint8 RGB image;
2. softmax over classes (so the CRF sees ``softmax(3 * cos)``), unary = ``-log(max(p, 1e-5))``
   (``pydensecrf.utils.unary_from_softmax``);
3. ``DenseCRF2D``: Gaussian kernel (sxy 1, compat 3) added first, then the bilateral kernel
   (sxy 67, srgb 3, compat 4);
4. 10 mean-field iterations; the result is the (C, H, W) marginal probabilities, whose argmax is
   the CRF prediction.
The published code hands the image to the bilateral kernel in BGR order (PIL -> numpy -> ``[..., ::-1]``).
An exact Gaussian would not care, but the permutohedral lattice that approximates it does a
little, so BGR is kept for identical results.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from utils.errors import STOP_SIGNALS, UserError

ITERATIONS = 10
GAUSSIAN_SXY, GAUSSIAN_COMPAT = 1, 3
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT = 67, 3, 4

CRFFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


class CRFError(UserError):
    """The CRF failed on a named image (worker died, hung, or raised)."""


def dense_crf(image: np.ndarray, logits: np.ndarray, iterations: int = ITERATIONS) -> np.ndarray:
    """CRF marginals (C, H, W) float32 from an RGB uint8 image (H, W, 3) and class scores (C, H, W).

    `logits` are unnormalised log-probabilities: a softmax over C is taken first.
    """
    image, logits = np.asarray(image), np.asarray(logits, dtype=np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"dense_crf: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if logits.ndim != 3 or logits.shape[1:] != image.shape[:2]:
        raise UserError(f"dense_crf: expected logits (C, {image.shape[0]}, {image.shape[1]}) "
                        f"matching the image, got {logits.shape}")
    if not np.isfinite(logits).all():
        raise UserError("dense_crf: logits contain NaN or infinity")
    n_classes, height, width = logits.shape
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    probs = shifted / shifted.sum(axis=0, keepdims=True)                 # (C, H, W)

    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))   # (C, H*W)
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=bgr, compat=BILATERAL_COMPAT)
    marginals = crf.inference(iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(n_classes, height, width)


def _crf_labels(crf_fn: CRFFunction, image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Worker task: CRF label map (H, W) int64."""
    return crf_fn(image, logits).argmax(axis=0).astype(np.int64)


def default_workers() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CRFPool:
    """Runs `crf_fn` over a batch of images in worker processes and returns argmax label maps.

    `workers=None` uses every core this process may run on; `workers=0` runs in this process.
    A worker that dies (killed, segfault) or a batch that exceeds `timeout_s` raises `CRFError`
    naming the image; it never hangs. Use as a context manager, or call `close()`.
    """

    def __init__(self, workers: int | None = None, crf_fn: CRFFunction = dense_crf,
                 timeout_s: float = 600.0) -> None:
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise UserError(f"CRF workers: expected 0 (in-process) or more, got {self.workers}")
        self.crf_fn = crf_fn
        self.timeout_s = timeout_s
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, images: Sequence[np.ndarray], logits: Sequence[np.ndarray],
            names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Label maps (H, W) int64 for images (B, H, W, 3) uint8 and logits (B, C, H, W)."""
        if len(images) != len(logits):
            raise UserError(f"CRFPool.map: {len(images)} images but {len(logits)} logit maps")
        names = [f"image {i}" for i in range(len(images))] if names is None else list(names)
        jobs = [(np.asarray(img), np.asarray(lg, dtype=np.float32)) for img, lg in zip(images, logits)]
        if self.workers == 0:
            return [self._serial(job, name) for job, name in zip(jobs, names)]
        return self._parallel(jobs, names)

    def _serial(self, job: tuple[np.ndarray, np.ndarray], name: str) -> np.ndarray:
        try:
            return _crf_labels(self.crf_fn, *job)
        except Exception as e:
            raise CRFError(f"CRF failed on {name}: {e}") from e

    def _parallel(self, jobs: list[tuple[np.ndarray, np.ndarray]], names: list[str]) -> list[np.ndarray]:
        if self._executor is None:
            self._executor = _new_executor(self.workers)
        with _workers_ignore_stop_signals():  # submit starts the worker processes
            futures = [self._executor.submit(_crf_labels, self.crf_fn, *job) for job in jobs]
        deadline = time.monotonic() + self.timeout_s
        results: list[np.ndarray | None] = [None] * len(jobs)
        for i, future in enumerate(futures):
            try:
                results[i] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except BrokenProcessPool:
                self._discard_executor()
                return self._redo_one_by_one(jobs, names, _finished(futures, results))
            except FutureTimeout:
                unfinished = [names[j] for j, f in enumerate(futures) if not f.done()]
                self._discard_executor()
                raise CRFError(f"CRF did not finish within {self.timeout_s:g} s; "
                               f"unfinished: {', '.join(unfinished)}") from None
            except Exception as e:
                for other in futures:
                    other.cancel()
                raise CRFError(f"CRF failed on {names[i]}: {e}") from e
        return results  # type: ignore[return-value]

    def _redo_one_by_one(self, jobs: list[tuple[np.ndarray, np.ndarray]], names: list[str],
                         results: list[np.ndarray | None]) -> list[np.ndarray]:
        """After a worker death, rerun the unfinished images alone in a fresh worker to name the culprit."""
        executor = _new_executor(1)
        try:
            for i, job in enumerate(jobs):
                if results[i] is not None:
                    continue
                try:
                    with _workers_ignore_stop_signals():
                        future = executor.submit(_crf_labels, self.crf_fn, *job)
                    results[i] = future.result(timeout=self.timeout_s)
                except BrokenProcessPool:
                    raise CRFError(f"CRF worker process died on {names[i]} "
                                   "(killed, or crashed inside the CRF code)") from None
                except FutureTimeout:
                    raise CRFError(f"CRF did not finish {names[i]} within {self.timeout_s:g} s") from None
                except Exception as e:
                    raise CRFError(f"CRF failed on {names[i]}: {e}") from e
        finally:
            _kill(executor)
        warnings.warn("a CRF worker process died, but every image succeeded when redone alone", stacklevel=2)
        return results  # type: ignore[return-value]

    def _discard_executor(self) -> None:
        if self._executor is not None:
            _kill(self._executor)
            self._executor = None


def _finished(futures: list[Future], results: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """Results of the futures that completed before the pool broke; None for the rest."""
    return [r if r is not None else (f.result() if f.done() and not f.cancelled() and f.exception() is None else None)
            for f, r in zip(futures, results)]


def _new_executor(workers: int) -> ProcessPoolExecutor:
    # forkserver/spawn: workers never inherit the parent's threads (torch, OpenMP) through fork.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


@contextlib.contextmanager
def _workers_ignore_stop_signals():
    """Processes started inside ignore SIGINT and SIGTERM for life (an ignored signal stays ignored across
    exec, and Python then installs no KeyboardInterrupt handler): Ctrl-C or a scheduler's SIGTERM to the
    process group stops the main process alone, which shuts the pool down, instead of printing a
    traceback from every worker. A signal that arrives in these few milliseconds is lost."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _kill(executor: ProcessPoolExecutor) -> None:
    """Stop `executor` without waiting for hung workers (Python < 3.14 has no public way)."""
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        process.kill()  # SIGKILL: the workers ignore SIGTERM
    executor.shutdown(wait=False, cancel_futures=True)
