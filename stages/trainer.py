"""The epoch/step loop every training stage shares.

Every rank starts from rank 0's weights. One step: stage forward (under autocast) -> loss; a
non-finite loss on any rank skips the step on all ranks (--max_nonfinite in a row save the state and
stop); otherwise backward, gradient average over ranks, clip, optimizer step, then the stage's
after-step hook (EMA, concept bank). Under --published_recipe every rank is an independent replica
on its own shard: no gradient average, and a non-finite loss skips that rank's step only. After
every epoch the stage's validation (if any) is printed and logged. State (modules, optimizers,
schedulers, scaler, extra state, RNG of every rank, position, settings) is saved at epoch ends and
every --save_every steps, so --resume continues to the same result as an uninterrupted run; a state
left by a run with other settings, or found without --resume, stops the run instead.

Signals. SIGINT (Ctrl-C) and SIGTERM (what SLURM and other schedulers send before a kill or a requeue)
during the loop behave the same: the step in progress finishes, every rank saves the state once (rank 0
writes it; the others wait until it is written) and StoppedByUser is raised; the entry point
(stages/cli.py) prints the resume command once and exits 130 (SIGINT) or 143 (SIGTERM), so a
requeue-friendly launcher only needs "non-zero exit and the state saved", then reruns with --resume
(or always with --resume auto). A signal during the last step lets the stage write its artifact: the
stage has finished, says so in one line and exits 0, so the jobs that depend on it go on (`bash run`
traps the signal itself and stops before its next stage). The state is saved at every epoch end
before the epoch's validation: a signal during validation abandons it at once and exits 130/143.
DataLoader workers ignore both signals (a scheduler signals every process of the job), so they keep
feeding until the main process has saved. In a single process a second signal stops at once; under
torchrun or --gpu spawning the launcher forwards the signal it got, so a repeat is expected and
ignored there (the launcher's own kill timeout is the hard stop). The last saved state stays whole
either way, since every save is atomic.
"""
from __future__ import annotations

import contextlib
import datetime
import secrets
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as tdist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from loader.sampler import make_loader
from stages.common import Run
from utils.distributed import any_rank, average_gradients, barrier, broadcast_from_main, in_launched_worker, is_enabled
from utils.errors import STOP_SIGNALS, StoppedByUser, UserError
from utils.io import ensure_writable_dir, load_torch, save_torch, settings_mismatch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class StepOutput:
    loss: torch.Tensor                                   # scalar to minimise
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # handed to the after-step hook


@dataclass
class Trainer:
    run: Run
    name: str                                  # stage name, used for the state file and logs
    state_path: Path
    settings: dict[str, Any]                   # the artifact's settings: a resumed run must have the same
    stateful: dict[str, Stateful]              # modules, bank, generators ...: everything resume restores
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    clip_params: list[torch.nn.Parameter]
    clip_norm: float | None
    step_fn: Callable[[dict], StepOutput]
    after_step: Callable[[StepOutput], None] = lambda out: None
    probe_scalars: tuple[str, ...] = ()        # scalars of the linear probe: not shown when the data has no labels
    validate: Callable[[], dict[str, float]] | None = None  # val-split scores after each epoch

    def __post_init__(self) -> None:
        self.scaler = self.run.amp.scaler()
        self.epoch, self.step_in_epoch, self.global_step, self.nonfinite = 0, 0, 0, 0
        self.skipped_total = 0
        self.hidden: set[str] = set()  # scalars not measured in this run
        params = {id(p): p for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        self.params = list(params.values())
        self.writer: SummaryWriter | None = None  # opened at the first event of rank 0 (see _tensorboard)
        self.log_dir: Path | None = None          # rank 0's TensorBoard folder of this run, set by fit

    # --- state -------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.run.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.run.device)
        return state

    def _all_rng_states(self) -> list[dict[str, Any]]:
        mine = self._rng_state()
        if not is_enabled():
            return [mine]
        states: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(states, {k: v.cpu() for k, v in mine.items()})
        return states

    def save_state(self) -> None:
        rngs = self._all_rng_states()  # collective: every rank takes part
        if not self.run.dist.is_main:
            return
        save_torch({
            "stage": self.name, "settings": self.settings, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "skipped_total": self.skipped_total, "nonfinite": self.nonfinite,
            "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(), "rng": rngs, "world_size": self.run.dist.world_size,
            "excluded_images": sorted(self.run.excluded),
        }, self.state_path)

    def load_state(self) -> None:
        state = load_torch(self.state_path, "resume state")
        if state.get("stage") != self.name:
            raise UserError(f"{self.state_path} holds the state of stage {state.get('stage')!r}, not {self.name!r}")
        if state["world_size"] != self.run.dist.world_size:
            raise UserError(f"{self.state_path} was saved by {state['world_size']} process(es); "
                            f"resume with the same number (this run has {self.run.dist.world_size})")
        diffs = settings_mismatch(state.get("settings", {}), self.settings)
        if diffs:
            raise UserError(f"{self.state_path} was saved by a run with other settings ({'; '.join(diffs)}); "
                            f"resume with the same flags, or pass --overwrite without --resume to start over")
        for k, v in self.stateful.items():
            v.load_state_dict(state["stateful"][k])
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.run.dist.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.run.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.run.device)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.skipped_total = state["global_step"], state["skipped_total"]
        self.nonfinite = state["nonfinite"]
        self.run.excluded.update(state.get("excluded_images", ()))  # left out before the interruption

    def discard_state(self) -> None:
        """Remove the resume state once the stage's artifact is written."""
        if self.run.dist.is_main:
            self.state_path.unlink(missing_ok=True)

    # --- loop --------------------------------------------------------------------------------
    def fit(self, dataset, epochs: int, batch_size: int) -> None:
        run, args = self.run, self.run.args
        if args.resume is True or (args.resume == "auto" and not args.overwrite and self.state_path.exists()):
            self.load_state()
            run.log(f"resumed {self.name} from {self.state_path}: epoch {min(self.epoch + 1, epochs)}/{epochs}, "
                    f"{self.step_in_epoch} step(s) of it done")
        elif self.state_path.exists() and not args.overwrite:
            raise UserError(f"{self.state_path} holds the state of an interrupted run: pass --resume to continue it, "
                            f"or --overwrite to start over")
        broadcast_from_main([m for m in self.stateful.values() if isinstance(m, torch.nn.Module)])
        steps_per_epoch = len(make_loader(dataset, batch_size, 0, run.device, **self._shard()))
        if args.max_steps is not None:
            steps_per_epoch = min(steps_per_epoch, args.max_steps)
        if run.dist.is_main:
            # the artifact's own folder under --log_dir: dataset (a directory dataset's own folder), backbone, K;
            # then one folder per run, so that two runs' curves never overlap
            self.log_dir = Path(args.log_dir) / self.state_path.parent.relative_to(args.output_dir) / self.name / \
                f"{datetime.datetime.now():%Y%m%d-%H%M%S}_{secrets.token_hex(3)}"
        if self.probe_scalars and not dataset.has_labels:
            self.hidden = set(self.probe_scalars)
            run.log(f"[{self.name}] probe skipped: no labels")
            if self._tensorboard() is not None:
                self.writer.add_text(f"{self.name}/probe", "skipped: no labels", self.global_step)
        with _stop_requests() as stop:
            try:
                self._loop(dataset, epochs, batch_size, steps_per_epoch, stop)
            finally:
                if self.writer is not None:
                    self.writer.close()
            if any_rank(stop.requested, run.device):  # during the last step: the stage still ends, and exits 0
                run.stop_signal = stop.signum
        if self.skipped_total:
            run.log(f"warning: {self.skipped_total} step(s) skipped because the loss was not finite")

    def _loop(self, dataset, epochs: int, batch_size: int, steps_per_epoch: int, stop: "_StopRequest") -> None:
        run, args = self.run, self.run.args
        while self.epoch < epochs:
            loader = make_loader(dataset, batch_size, args.num_workers, run.device, seed=args.seed,
                                 epoch=self.epoch, skip_batches=self.step_in_epoch, **self._shard())
            bar = tqdm(loader, total=steps_per_epoch - self.step_in_epoch, disable=not run.dist.is_main,
                       desc=f"[{self.name}] epoch {self.epoch + 1}/{epochs}", dynamic_ncols=True)
            stepping = False
            try:
                for batch in bar:
                    if self.step_in_epoch >= steps_per_epoch:
                        break
                    stepping = True
                    out = self._one_step(batch)
                    stepping = False
                    self.step_in_epoch += 1
                    if out is not None:
                        bar.set_postfix(self._shown(out))
                    if self.step_in_epoch < steps_per_epoch:
                        if any_rank(stop.requested, run.device):
                            self._stop(stop)
                        if args.save_every and self.step_in_epoch % args.save_every == 0:
                            self.save_state()
            except Exception:
                if stepping or not stop.requested:
                    raise
                self._stop(stop)  # the signal also stopped the loader's workers; the last step is complete
            finally:
                bar.close()
            for s in self.schedulers:
                s.step()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save_state()
            if any_rank(stop.requested, run.device):  # came during the epoch's last step
                if self.epoch < epochs:
                    barrier()  # every rank leaves once rank 0 has written the state
                    raise StoppedByUser(self.state_path, stop.signum)
                if self.validate is not None:
                    run.log(f"[{self.name}] validation after epoch {self.epoch} skipped: a stop was requested")
            elif self.validate is not None:
                self._log_validation(self._validate_until_stopped(stop))

    def _validate_until_stopped(self, stop: "_StopRequest") -> dict[str, float]:
        """The epoch-end validation; a stop during it leaves at once (the state of this epoch end is saved).

        Each rank leaves on its own signal, with no collective after it (a peer may be in a different one)."""
        stop.raises = True
        try:
            return self.validate()
        except _StopDuringValidation:
            self.run.log(f"[{self.name}] stopped during the validation after epoch {self.epoch}; the state of "
                         f"this epoch end is saved")
            raise StoppedByUser(self.state_path, stop.signum) from None
        finally:
            stop.raises = False

    def _shard(self) -> dict[str, Any]:
        """This rank's part of the training set: a data-parallel shard, or the recipe's replica shard in
        DistributedSampler order."""
        run = self.run
        return dict(rank=run.dist.rank, world_size=run.replicas, torch_order=run.recipe)

    def _shown(self, out: StepOutput) -> dict[str, str]:
        """Progress-bar values of a step: the measured scalars, and the probe's status when it is skipped."""
        shown = {k: f"{v.item():.3f}" for k, v in out.scalars.items() if k not in self.hidden}
        if self.hidden:
            shown["probe"] = "skipped: no labels"
        return shown

    def _stop(self, stop: "_StopRequest") -> None:
        """Save the state between two steps and leave the loop (every rank, once rank 0 has written it)."""
        self.save_state()
        barrier()
        raise StoppedByUser(self.state_path, stop.signum)

    def _tensorboard(self) -> SummaryWriter | None:
        """Rank 0's writer, opened at the run's first event: a run that stops before it leaves no event file."""
        if self.writer is None and self.log_dir is not None:
            self.writer = SummaryWriter(log_dir=str(ensure_writable_dir(self.log_dir)))
        return self.writer

    def _log_validation(self, scores: dict[str, float]) -> None:
        where = " (on the training folder)" if self.run.args.dataset == "directory" else ""
        self.run.log(f"[{self.name}] validation{where} after epoch {self.epoch}: "
                     + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        if self._tensorboard() is not None:
            for k, v in scores.items():
                self.writer.add_scalar(f"{self.name}/val/{k}", v, self.epoch)

    def _one_step(self, batch: dict) -> StepOutput | None:
        run = self.run
        with run.amp.autocast():
            out = self.step_fn(batch)
        bad = not bool(torch.isfinite(out.loss.detach()).item())
        if not run.recipe:
            bad = any_rank(bad, run.device)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.nonfinite = self.nonfinite + 1 if bad else 0
        # replicas skip on their own but stop together: saving the state is a collective
        stop = any_rank(self.nonfinite >= run.args.max_nonfinite, run.device) if run.recipe \
            else self.nonfinite >= run.args.max_nonfinite
        if bad or stop:
            self.skipped_total += int(bad)
            if stop:
                self.save_state()  # skipped steps left the weights as the last good step made them
                raise UserError(f"{self.name}: the loss was not finite for {self.nonfinite} steps in a row "
                                f"(epoch {self.epoch + 1}, step {self.step_in_epoch + 1}); the last good state is kept "
                                f"in {self.state_path} (--resume continues from it); check the inputs, or lower "
                                f"--lr and pass --overwrite to start over")
            return None
        self.scaler.scale(out.loss).backward()
        if not run.recipe:
            average_gradients(self.params)
        if self.clip_norm is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.clip_params, self.clip_norm)
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.after_step(out)
        self.global_step += 1
        if self._tensorboard() is not None:
            for k, v in out.scalars.items():
                if k not in self.hidden:
                    self.writer.add_scalar(f"{self.name}/{k}", float(v), self.global_step)
        return out



class _StopRequest:
    requested = False
    signum = signal.SIGINT  # the first stop signal received
    raises = False          # set while nothing is left to save (validation): the first stop raises at once


class _StopDuringValidation(BaseException):
    """A stop signal during the epoch-end validation (the state was saved before it); like KeyboardInterrupt,
    not an Exception, so that no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def _stop_requests() -> Iterator[_StopRequest]:
    """While inside: the first SIGINT or SIGTERM only sets `requested` (checked between steps). A
    second Ctrl-C (SIGINT) raises KeyboardInterrupt at once, except in a process of a launcher (torchrun,
    --gpu spawning), which forwards the signal it got itself. A repeated SIGTERM is ignored: schedulers
    send it more than once (SLURM signals every process of a requeued job, and a batch script may forward
    its own), and a kill follows anyway if the save is late. Once a stop was requested, the state is saved
    and the process is on its way out: stop signals stay ignored after the loop, so that a late copy (a
    launcher forwarding the signal its ranks already got) cannot raise in the middle of the exit. Outside
    the main thread, signals stay as they are."""
    stop = _StopRequest()
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
            raise _StopDuringValidation

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if stop.requested else handler)
