"""Dense CRF: it cleans noisy logits along colour edges, follows the published pipeline, and the
process pool matches the serial path and fails fast, naming the image, when a worker dies."""
from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax
from scipy.special import log_softmax, softmax

from utils.crf import CRFError, CRFPool, default_workers, dense_crf
from utils.errors import UserError

MARKER = 7      # images whose first pixel is (7, 7, 7) trigger the injected faults below
# No torch import here: pool workers import this module for the fault functions, and fast.


def two_halves(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Red left half, blue right half: image (H,W,3) uint8, noisy logits (2,H,W), truth (H,W)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, size // 2:] = 1
    image = np.where(truth[..., None] == 0, [200, 40, 40], [40, 40, 200])
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    clean = np.stack([truth == 0, truth == 1]).astype(np.float32)
    logits = log_softmax(3 * (clean * 0.5 + rng.normal(0, 1, clean.shape)), axis=0)
    return image, logits.astype(np.float32), truth


def test_crf_recovers_the_halves_better_than_argmax() -> None:
    image, logits, truth = two_halves(0)
    before = (logits.argmax(0) == truth).mean()
    probs = dense_crf(image, logits)
    after = (probs.argmax(0) == truth).mean()
    assert probs.shape == logits.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert before < 0.7 and after > 0.9


def test_follows_the_published_pipeline_with_a_bgr_image() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    logits = log_softmax(3 * rng.normal(size=(5, 24, 32)), axis=0).astype(np.float32)
    probs = softmax(logits, axis=0)
    crf = dcrf.DenseCRF2D(32, 24, 5)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image[:, :, ::-1]), compat=4)
    expected = np.asarray(crf.inference(10)).reshape(5, 24, 32)
    np.testing.assert_allclose(dense_crf(image, logits), expected, atol=1e-4)


@pytest.mark.parametrize("image, logits, match", [
    (np.zeros((8, 8, 3), np.float32), np.zeros((2, 8, 8)), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 9)), "matching the image"),
    (np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 8), np.nan), "NaN"),
])
def test_bad_input_is_a_user_error(image: np.ndarray, logits: np.ndarray, match: str) -> None:
    with pytest.raises(UserError, match=match):
        dense_crf(image, logits)


def batch(n: int, marked: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, logits = [], []
    for seed in range(n):
        image, logit, _ = two_halves(seed, size=32)
        if seed == marked:
            image[0, 0] = MARKER
        images.append(image)
        logits.append(logit)
    return images, logits


def _is_marked(image: np.ndarray) -> bool:
    return bool((image[0, 0] == MARKER).all())


def _dies_on_marker(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    if _is_marked(image):
        os._exit(3)                                          # like a segfault: no exception, no cleanup
    return dense_crf(image, logits)


def _dies_once(flag: str, image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    if _is_marked(image) and not os.path.exists(flag):
        Path(flag).touch()
        os._exit(3)
    return dense_crf(image, logits)


def _raises_on_marker(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    if _is_marked(image):
        raise ValueError("bad pixels")
    return dense_crf(image, logits)


def _hangs_on_marker(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    if _is_marked(image):
        time.sleep(60)
    return dense_crf(image, logits)


NAMES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]


def _labels_if_stop_signals_ignored(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))
    if not ignored:
        raise ValueError("this worker would stop on SIGINT/SIGTERM")
    return logits


def test_workers_ignore_stop_signals() -> None:
    """Ctrl-C or a scheduler's SIGTERM to the process group stops the main process only (no worker traceback)."""
    images, logits = batch(2)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with CRFPool(workers=2, crf_fn=_labels_if_stop_signals_ignored, timeout_s=60) as pool:
        assert len(pool.map(images, logits)) == 2
    assert {s: signal.getsignal(s) for s in before} == before  # the main process's handlers are back


def test_pool_matches_serial() -> None:
    images, logits = batch(5)
    with CRFPool(workers=0) as serial, CRFPool(workers=2) as pool:
        expected = serial.map(images, logits)
        got = pool.map(images, logits)
        again = pool.map(images[:2], logits[:2])             # the pool is reused across batches
    assert all(e.dtype == np.int64 and e.shape == (32, 32) for e in expected)
    for e, g in zip(expected + expected[:2], got + again):
        np.testing.assert_array_equal(e, g)


def test_dead_worker_raises_naming_the_image_and_the_pool_recovers() -> None:
    images, logits = batch(5, marked=2)
    with CRFPool(workers=2, crf_fn=_dies_on_marker, timeout_s=30) as pool:
        start = time.monotonic()
        with pytest.raises(CRFError, match=r"died on c\.jpg"):
            pool.map(images, logits, names=NAMES)
        assert time.monotonic() - start < 15
        clean_images, clean_logits = batch(2)
        assert len(pool.map(clean_images, clean_logits)) == 2


def test_transient_worker_death_is_redone_with_a_warning(tmp_path: Path) -> None:
    images, logits = batch(4, marked=1)
    crf_fn = functools.partial(_dies_once, str(tmp_path / "died"))
    with CRFPool(workers=2, crf_fn=crf_fn, timeout_s=30) as pool, pytest.warns(UserWarning, match="redone"):
        got = pool.map(images, logits)
    with CRFPool(workers=0) as serial:
        expected = serial.map(images, logits)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


@pytest.mark.parametrize("workers", [0, 2])
def test_exception_in_crf_names_the_image(workers: int) -> None:
    images, logits = batch(3, marked=1)
    with CRFPool(workers=workers, crf_fn=_raises_on_marker) as pool:
        with pytest.raises(CRFError, match=r"CRF failed on b\.jpg: bad pixels"):
            pool.map(images, logits, names=NAMES[:3])


def test_hung_worker_times_out_naming_the_image() -> None:
    images, logits = batch(3, marked=0)
    with CRFPool(workers=2, crf_fn=_hangs_on_marker, timeout_s=2) as pool:
        start = time.monotonic()
        with pytest.raises(CRFError, match=r"did not finish within 2 s; unfinished: a\.jpg"):
            pool.map(images, logits, names=NAMES[:3])
        assert time.monotonic() - start < 10


def test_pool_settings() -> None:
    assert CRFPool().workers == default_workers() == len(os.sched_getaffinity(0))
    with pytest.raises(UserError, match="workers"):
        CRFPool(workers=-1)
    with pytest.raises(UserError, match="2 images but 1 logit"):
        CRFPool(workers=0).map([np.zeros((4, 4, 3), np.uint8)] * 2, [np.zeros((2, 4, 4))])
