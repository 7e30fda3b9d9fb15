"""Stage 1: learn the concept codebook (K, D) by maximising soft modularity of patch affinities."""
from __future__ import annotations

from typing import Any

import torch

from modules.functional import modularity_loss, stochastic_sampling
from modules.segment import Cluster
from stages.artifacts import already_done, input_records, save_artifact
from stages.common import Run
from stages.trainer import StepOutput, Trainer


def train_mediator(run: Run) -> None:
    args, settings = run.args, {**run.shared_settings(), **run.training_settings()}
    artifact = run.paths.codebook
    if already_done(run, artifact, settings):
        return
    inputs = input_records(run)
    trainer = build_trainer(run, settings)
    dataset = run.dataset("train", run.derived.train_resolution)
    trainer.fit(dataset, args.epoch, args.batch_size)
    codebook = trainer.stateful["cluster"].codebook
    save_artifact(run, codebook.detach().cpu().numpy().astype("float32"), artifact, settings, inputs)
    trainer.state.discard()


def build_trainer(run: Run, settings: dict[str, Any]) -> Trainer:
    """The codebook, its optimizer and the one-step function of stage 1, in the shared loop."""
    args = run.args
    cluster = Cluster(run.derived.embed_dim, num_codebook=args.num_codebook,  # only its codebook is trained
                      n_classes=run.derived.n_classes).to(run.device)
    codebook = cluster.codebook  # (K, D), uniform in [-1/K, 1/K]
    optimizer = torch.optim.Adam([codebook], lr=run.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)

    def step(batch: dict) -> StepOutput:
        feat = run.train_features(batch)  # (B, N, D)
        if args.grid:
            feat, _ = stochastic_sampling(feat)  # (B, n, D)
        loss = modularity_loss(codebook, feat, published_fp16=run.recipe)
        return StepOutput(loss=loss, scalars={"modularity": loss.detach()})

    return Trainer(run, "mediator", run.paths.codebook.with_name("state_mediator.pth"), settings, {"cluster": cluster},
                   [optimizer], [scheduler], clip_params=[], clip_norm=None, step_fn=step)
