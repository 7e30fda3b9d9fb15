"""One optimization step of a training stage.

The stage's forward (under autocast) gives the loss; a non-finite loss on any rank skips the step on all
ranks; otherwise backward, gradient average over ranks, clip, optimizer step, then the stage's after-step
hook (EMA, concept bank). Under --published_recipe every rank is an independent replica on its own shard:
no gradient average, and a non-finite loss skips that rank's step only. After --max_nonfinite skipped
steps in a row the step gives up (the loop saves the state and stops the run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from stages.common import Run
from utils.distributed import any_rank, average_gradients


@dataclass
class StepOutput:
    loss: torch.Tensor                                   # scalar to minimise
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # handed to the after-step hook


@dataclass
class TrainingStep:
    run: Run
    step_fn: Callable[[dict], StepOutput]      # the stage's forward: batch -> loss and scalars
    optimizers: list[torch.optim.Optimizer]
    clip_params: list[torch.nn.Parameter]
    clip_norm: float | None
    after_step: Callable[[StepOutput], None]

    def __post_init__(self) -> None:
        self.scaler = self.run.amp.scaler()
        self.nonfinite, self.skipped_total = 0, 0  # non-finite losses in a row; steps skipped in all
        self.gave_up = False                       # --max_nonfinite skipped in a row, on some rank
        params = {id(p): p for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        self.params = list(params.values())

    def __call__(self, batch: dict) -> StepOutput | None:
        """The step's output, or None when a non-finite loss skipped it (then see `gave_up`)."""
        run = self.run
        with run.amp.autocast():
            out = self.step_fn(batch)
        bad = not bool(torch.isfinite(out.loss.detach()).item())
        if not run.recipe:
            bad = any_rank(bad, run.device)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.nonfinite = self.nonfinite + 1 if bad else 0
        # replicas skip on their own but give up together: saving the state is a collective
        self.gave_up = any_rank(self.nonfinite >= run.args.max_nonfinite, run.device) if run.recipe \
            else self.nonfinite >= run.args.max_nonfinite
        if bad or self.gave_up:
            self.skipped_total += int(bad)
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
        return out
