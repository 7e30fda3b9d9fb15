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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as tdist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from loader.sampler import make_loader
from stages.common import Run
from utils.distributed import any_rank, average_gradients, broadcast_from_main, is_enabled
from utils.errors import UserError
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
    validate: Callable[[], dict[str, float]] | None = None  # val-split scores after each epoch

    def __post_init__(self) -> None:
        self.scaler = self.run.amp.scaler()
        self.epoch, self.step_in_epoch, self.global_step, self.nonfinite = 0, 0, 0, 0
        self.skipped_total = 0
        params = {id(p): p for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        self.params = list(params.values())
        self.writer = None
        if self.run.dist.is_main:
            log_dir = Path(self.run.args.log_dir) / self.run.args.dataset / self.state_path.parent.name / self.name
            self.writer = SummaryWriter(log_dir=str(ensure_writable_dir(log_dir)))

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
        self.run.log(f"resumed {self.name} from {self.state_path} at epoch {self.epoch}, step {self.step_in_epoch}")

    def discard_state(self) -> None:
        """Remove the resume state once the stage's artifact is written."""
        if self.run.dist.is_main:
            self.state_path.unlink(missing_ok=True)

    # --- loop --------------------------------------------------------------------------------
    def fit(self, dataset, epochs: int, batch_size: int) -> None:
        run, args = self.run, self.run.args
        if args.resume:
            self.load_state()
        elif self.state_path.exists() and not args.overwrite:
            raise UserError(f"{self.state_path} holds the state of an interrupted run: pass --resume to continue it, "
                            f"or --overwrite to start over")
        broadcast_from_main([m for m in self.stateful.values() if isinstance(m, torch.nn.Module)])
        shard = dict(rank=run.dist.rank, world_size=run.replicas, torch_order=run.recipe)
        steps_per_epoch = len(make_loader(dataset, batch_size, 0, run.device, **shard))
        if args.max_steps is not None:
            steps_per_epoch = min(steps_per_epoch, args.max_steps)
        while self.epoch < epochs:
            loader = make_loader(dataset, batch_size, args.num_workers, run.device, seed=args.seed,
                                 epoch=self.epoch, skip_batches=self.step_in_epoch, **shard)
            bar = tqdm(loader, total=steps_per_epoch - self.step_in_epoch, disable=not run.dist.is_main,
                       desc=f"[{self.name}] epoch {self.epoch + 1}/{epochs}", dynamic_ncols=True)
            for batch in bar:
                if self.step_in_epoch >= steps_per_epoch:
                    break
                out = self._one_step(batch)
                self.step_in_epoch += 1
                if out is not None:
                    bar.set_postfix({k: f"{v.item():.3f}" for k, v in out.scalars.items()})
                if args.save_every and self.step_in_epoch % args.save_every == 0 \
                        and self.step_in_epoch < steps_per_epoch:
                    self.save_state()
            bar.close()
            for s in self.schedulers:
                s.step()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save_state()
            if self.validate is not None:
                self._log_validation(self.validate())
        if self.skipped_total:
            run.log(f"warning: {self.skipped_total} step(s) skipped because the loss was not finite")
        if self.writer is not None:
            self.writer.close()

    def _log_validation(self, scores: dict[str, float]) -> None:
        self.run.log(f"[{self.name}] validation after epoch {self.epoch}: "
                     + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        if self.writer is not None:
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
        if self.writer is not None:
            for k, v in out.scalars.items():
                self.writer.add_scalar(f"{self.name}/{k}", float(v), self.global_step)
        return out
