"""Fast implementations vs the loop references, same inputs, same process: one markdown table.

    python -m benchmarks.bench_losses [--device cpu|cuda] [--sizes small|paper] [--repeats 3] [--threads N]

Rows: concept-bank update + read at a full bank (K x 100 entries), contrastive loss forward +
backward against that full bank, modularity loss forward + backward.  Times are the best of
``--repeats`` runs after one warm-up (robust to other load on the machine).  Peak memory is the
extra memory one forward + backward needs above its inputs: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs) of a fresh spawned process that only builds the inputs and runs the case
once, with glibc's mmap threshold pinned so freed blocks leave RSS.
On CPU at paper sizes two cells are extrapolated and marked ``~``: the reference bank read
(quadratic: one concatenation per concept) is timed on 256 concepts and scaled by (K / 256)^2,
and the contrastive loss (linear in anchor images, for both) is run with 2 of the 16 anchor
images and its times scaled by 8 (its peak memory is that of the 2-image run).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import time
from typing import Callable

import torch

from benchmarks.reference import ReferenceBank, contrastive_loss_reference, modularity_loss_reference
from modules.bank import ConceptBank
from modules.functional import contrastive_loss, modularity_loss

SIZES = {
    "small": dict(K=512, p=256, B=8, n=100, D=384),
    "paper": dict(K=2048, p=2048, B=16, n=100, D=768),
}
CAPACITY = 100
SUBSET_CONCEPTS = 256


def _full_bank(kind: type, K: int, p: int, device: str, seed: int = 0) -> ConceptBank | ReferenceBank:
    """A bank with every concept at capacity."""
    bank = kind(K, p, CAPACITY, device=device)
    fill_bank(bank, K, p, device, seed)
    return bank


def fill_bank(bank: ConceptBank | ReferenceBank, K: int, p: int, device: str | torch.device, seed: int = 0) -> None:
    """Fill every concept of `bank` to CAPACITY random vectors through the public update."""
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(K).repeat_interleave(CAPACITY).view(1, -1).to(device)  # (1, K * cap)
    bank.update(index, torch.randn(1, K * CAPACITY, p, generator=g).to(device), keep_ratio=1.0,
                generator=torch.Generator(device).manual_seed(seed))


def bank_case(s: dict, device: str, impl: str, parts: tuple[str, ...] = ("update", "read")) -> Callable[[], object]:
    """One step on a full bank: update with B x n new vectors, then read every entry."""
    g = torch.Generator().manual_seed(1)
    index = torch.randint(s["K"], (s["B"], s["n"]), generator=g).to(device)
    vectors = torch.randn(s["B"], s["n"], s["p"], generator=g).to(device)
    bank = _full_bank(ConceptBank if impl == "fast" else ReferenceBank, s["K"], s["p"], device)
    rng = torch.Generator(device).manual_seed(2)

    def step() -> object:
        if "update" in parts:
            bank.update(index, vectors, generator=rng)
        return bank.entries() if "read" in parts else None
    return step


def contrastive_case(s: dict, device: str, impl: str) -> Callable[[], torch.Tensor]:
    B, n, D, K, p = s["B"], s["n"], s["D"], s["K"], s["p"]
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(B, n, D, generator=g).to(device)
    codebook = torch.randn(K, D, generator=g).to(device)
    proj = torch.randn(B, n, p, generator=g).to(device).requires_grad_(True)
    proj_ema = torch.randn(B, n, p, generator=g).to(device)
    bank_index = torch.arange(K, device=device).repeat_interleave(CAPACITY)  # full bank
    bank_proj = torch.randn(K * CAPACITY, p, generator=g).to(device)
    fn = contrastive_loss if impl == "fast" else contrastive_loss_reference

    def step() -> torch.Tensor:
        loss = fn(feat, proj, proj_ema, codebook, bank_index, bank_proj)
        (grad,) = torch.autograd.grad(loss, proj)
        return torch.cat([loss.detach().view(1), grad.flatten()])
    return step


def modularity_case(s: dict, device: str, impl: str) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(s["B"], s["n"], s["D"], generator=g).to(device)
    codebook = torch.empty(s["K"], s["D"]).uniform_(-1 / s["K"], 1 / s["K"], generator=g).to(device)
    codebook.requires_grad_(True)
    fn = modularity_loss if impl == "fast" else modularity_loss_reference

    def step() -> torch.Tensor:
        loss = fn(codebook, x)
        (grad,) = torch.autograd.grad(loss, codebook)
        return torch.cat([loss.detach().view(1), grad.flatten()])
    return step


CASES = {"bank": bank_case, "contrastive": contrastive_case, "modularity": modularity_case}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], object], device: str, repeats: int) -> tuple[float, object]:
    out = step()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def _vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _cpu_peak_child(case: str, s: dict, impl: str, queue: mp.Queue) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    step = CASES[case](s, "cpu", impl)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    base = _vm("VmRSS")
    step()
    queue.put(_vm("VmHWM") - base)


def peak_bytes(case: str, s: dict, device: str, impl: str) -> int:
    """Extra memory of one run of the case above what its inputs hold."""
    if device == "cuda":
        step = CASES[case](s, device, impl)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del step
        torch.cuda.empty_cache()
        return peak
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.environ["BENCH_THREADS"] = str(torch.get_num_threads())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_cpu_peak_child, args=(case, s, impl, queue))
    child.start()
    peak = queue.get()
    child.join()
    return peak


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_bytes(b: int) -> str:
    return f"{b / 2**20:.0f} MiB"


def _max_diff(a: object, b: object) -> float:
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", choices=list(SIZES), default="small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s, dev, reps = SIZES[args.sizes], args.device, args.repeats
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare in plain fp32
    approx = dev == "cpu" and args.sizes == "paper"
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"sizes={args.sizes} {s} capacity={CAPACITY} device={dev} ({where})\n")
    print("| case | reference | fast | speed-up | peak mem reference | peak mem fast | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    M = s["K"] * CAPACITY

    t_fast, out_fast = timed(bank_case(s, dev, "fast"), dev, reps)
    if approx:
        t_update, _ = timed(bank_case(s, dev, "reference", ("update",)), dev, reps)
        t_read, _ = timed(bank_case(dict(s, K=SUBSET_CONCEPTS), dev, "reference", ("read",)), dev, 1)
        t_ref, diff = t_update + t_read * (s["K"] / SUBSET_CONCEPTS) ** 2, "checked at small sizes"
    else:
        t_ref, out_ref = timed(bank_case(s, dev, "reference"), dev, reps)
        diff = f"{_max_diff(out_ref, out_fast):.1e}"
    _row(f"bank update+read (K={s['K']}, M={M})", t_ref, t_fast, None, None, diff, (approx, False))

    sub = dict(s, B=2) if approx else s
    scale = s["B"] / sub["B"]
    for case, label, sizes in (
            ("contrastive", f"contrastive fwd+bwd (Bn={s['B'] * s['n']}, M={M}, p={s['p']})", sub),
            ("modularity", f"modularity fwd+bwd (B={s['B']}, n={s['n']}, K={s['K']})", s)):
        k = scale if sizes is sub else 1.0
        t_fast, out_fast = timed(CASES[case](sizes, dev, "fast"), dev, reps)
        t_ref, out_ref = timed(CASES[case](sizes, dev, "reference"), dev, reps)
        mem = [peak_bytes(case, sizes, dev, impl) for impl in ("reference", "fast")]
        _row(label, t_ref * k, t_fast * k, *mem, f"{_max_diff(out_ref, out_fast):.1e}", (k != 1.0, k != 1.0))


def _row(label: str, t_ref: float, t_fast: float, m_ref: int | None, m_fast: int | None, diff: str,
         approx: tuple[bool, bool]) -> None:
    """One table row; ``approx`` marks the (reference, fast) times that are extrapolated."""
    a_ref, a_fast = ("~" if a else "" for a in approx)
    mem = [_fmt_bytes(m) if m is not None else "-" for m in (m_ref, m_fast)]
    print(f"| {label} | {a_ref}{_fmt_time(t_ref)} | {a_fast}{_fmt_time(t_fast)} | {a_ref or a_fast}"
          f"{t_ref / t_fast:.1f}x | {mem[0]} | {mem[1]} | {diff} |")


if __name__ == "__main__":
    main()
