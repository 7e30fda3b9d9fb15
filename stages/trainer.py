"""The epoch loop every training stage shares.

Every rank starts from rank 0's weights. Each epoch runs the stage's steps (stages/training_step.py) on
this rank's shard, then the schedulers; after every epoch the stage's validation (if any) is printed and
logged. The state (stages/training_state.py) is saved at epoch ends and every --save_every steps, so
--resume continues to the same result as an uninterrupted run.

Signals. SIGINT (Ctrl-C) and SIGTERM (what SLURM and other schedulers send before a kill or a requeue)
during the loop behave the same (stages/stop_requests.py): the step in progress finishes, every rank saves
the state once (rank 0 writes it; the others wait until it is written) and StoppedByUser is raised; the
entry point (stages/cli.py) prints the resume command once and exits 130 (SIGINT) or 143 (SIGTERM), so a
requeue-friendly launcher only needs "non-zero exit and the state saved", then reruns with --resume
(or always with --resume auto). A signal during the last step lets the stage write its artifact: the
stage has finished, says so in one line and exits 0, so the jobs that depend on it go on (`bash run`
traps the signal itself and stops before its next stage). The state is saved at every epoch end
before the epoch's validation: a signal during validation abandons it at once and exits 130/143.
DataLoader workers ignore both signals (a scheduler signals every process of the job), so they keep
feeding until the main process has saved.
"""
from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from loader.sampler import make_loader
from stages.common import Run
from stages.feature_cache import open_feature_cache
from stages.stop_requests import StopDuringValidation, StopRequest, stop_requests
from stages.training_state import Stateful, TrainingState
from stages.training_step import StepOutput, TrainingStep
from utils.distributed import any_rank, barrier, broadcast_from_main
from utils.errors import StoppedByUser, UserError
from utils.io import ensure_writable_dir


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
        self.step = TrainingStep(self.run, self.step_fn, self.optimizers, self.clip_params, self.clip_norm,
                                 self.after_step)
        self.state = TrainingState(self.run, self.name, self.state_path, self.settings, self.stateful,
                                   self.optimizers, self.schedulers, self.step.scaler)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.hidden: set[str] = set()  # scalars not measured in this run
        self.writer: SummaryWriter | None = None  # opened at the first event of rank 0 (see _tensorboard)
        self.log_dir: Path | None = None          # rank 0's TensorBoard folder of this run, set by fit

    def save_state(self) -> None:
        """The state with this position in the loop (a collective: every rank calls it)."""
        self.state.save({"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "skipped_total": self.step.skipped_total, "nonfinite": self.step.nonfinite})

    def load_state(self) -> None:
        state = self.state.load()
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.step.skipped_total = state["global_step"], state["skipped_total"]
        self.step.nonfinite = state["nonfinite"]

    def fit(self, dataset, epochs: int, batch_size: int) -> None:
        run, args = self.run, self.run.args
        open_feature_cache(run, dataset)  # --feature_cache: the steps' run.train_features read and fill it
        if self.state.resumes():
            self.load_state()
            run.log(f"resumed {self.name} from {self.state_path}: epoch {min(self.epoch + 1, epochs)}/{epochs}, "
                    f"{self.step_in_epoch} step(s) of it done")
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
        with stop_requests() as stop:
            try:
                self._loop(dataset, epochs, batch_size, steps_per_epoch, stop)
            finally:
                if self.writer is not None:
                    self.writer.close()
            if any_rank(stop.requested, run.device):  # during the last step: the stage still ends, and exits 0
                run.stop_signal = stop.signum
        if self.step.skipped_total:
            run.log(f"warning: {self.step.skipped_total} step(s) skipped because the loss was not finite")

    def _loop(self, dataset, epochs: int, batch_size: int, steps_per_epoch: int, stop: StopRequest) -> None:
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

    def _one_step(self, batch: dict) -> StepOutput | None:
        """A step, counted and logged (None when skipped); too many non-finite losses in a row save the state
        and stop the run."""
        out = self.step(batch)
        if self.step.gave_up:
            self.save_state()  # skipped steps left the weights as the last good step made them
            raise UserError(f"{self.name}: the loss was not finite for {self.step.nonfinite} steps in a row "
                            f"(epoch {self.epoch + 1}, step {self.step_in_epoch + 1}); the last good state is kept "
                            f"in {self.state_path} (--resume continues from it); check the inputs, or lower "
                            f"--lr and pass --overwrite to start over")
        if out is None:
            return None
        self.global_step += 1
        if self._tensorboard() is not None:
            for k, v in out.scalars.items():
                if k not in self.hidden:
                    self.writer.add_scalar(f"{self.name}/{k}", float(v), self.global_step)
        return out

    def _validate_until_stopped(self, stop: StopRequest) -> dict[str, float]:
        """The epoch-end validation; a stop during it leaves at once (the state of this epoch end is saved).

        Each rank leaves on its own signal, with no collective after it (a peer may be in a different one)."""
        try:
            with stop.raising_at_once():
                return self.validate()
        except StopDuringValidation:
            self.run.log(f"[{self.name}] stopped during the validation after epoch {self.epoch}; the state of "
                         f"this epoch end is saved")
            raise StoppedByUser(self.state_path, stop.signum) from None

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

    def _stop(self, stop: StopRequest) -> None:
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
