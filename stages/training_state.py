"""The resume state of a training stage: one file that --resume continues to the same result as an
uninterrupted run.

It holds the modules, optimizers, schedulers, AMP scaler and extra state (bank, generators), the RNG of
every rank, the position (epoch, step in it, optimizer steps, skipped steps) and the run's settings. A
state left by a run with other settings, by another number of processes, or found without --resume, stops
the run instead of being reused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as tdist

from stages.common import Run
from utils.distributed import is_enabled
from utils.errors import UserError
from utils.io import load_torch, save_torch, settings_mismatch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class TrainingState:
    run: Run
    stage: str
    path: Path
    settings: dict[str, Any]                   # the artifact's settings: a resumed run must have the same
    stateful: dict[str, Stateful]              # modules, bank, generators ...: everything resume restores
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    scaler: torch.amp.GradScaler

    def resumes(self) -> bool:
        """Whether this run continues the saved state: --resume, or --resume auto when a state is there
        (and no --overwrite). A state found otherwise stops the run, unless --overwrite starts over."""
        args = self.run.args
        if args.resume is True or (args.resume == "auto" and not args.overwrite and self.path.exists()):
            return True
        if self.path.exists() and not args.overwrite:
            raise UserError(f"{self.path} holds the state of an interrupted run: pass --resume to continue it, "
                            f"or --overwrite to start over")
        return False

    def save(self, position: dict[str, int]) -> None:
        """Write the state with the loop's `position` (rank 0 writes; a collective: every rank takes part)."""
        rngs = self._all_rng_states()
        if not self.run.dist.is_main:
            return
        save_torch({
            "stage": self.stage, "settings": self.settings, **position,
            "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(), "rng": rngs, "world_size": self.run.dist.world_size,
            "excluded_images": sorted(self.run.excluded),
        }, self.path)

    def load(self) -> dict[str, Any]:
        """Restore everything from the file after checking that it belongs to this run; returns the file's
        contents, whose position the loop takes up."""
        state = load_torch(self.path, "resume state")
        if state.get("stage") != self.stage:
            raise UserError(f"{self.path} holds the state of stage {state.get('stage')!r}, not {self.stage!r}")
        if state["world_size"] != self.run.dist.world_size:
            raise UserError(f"{self.path} was saved by {state['world_size']} process(es); "
                            f"resume with the same number (this run has {self.run.dist.world_size})")
        diffs = settings_mismatch(state.get("settings", {}), self.settings)
        if diffs:
            raise UserError(f"{self.path} was saved by a run with other settings ({'; '.join(diffs)}); "
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
        self.run.excluded.update(state.get("excluded_images", ()))  # left out before the interruption
        return state

    def discard(self) -> None:
        """Remove the state once the stage's artifact is written."""
        if self.run.dist.is_main:
            self.path.unlink(missing_ok=True)

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
