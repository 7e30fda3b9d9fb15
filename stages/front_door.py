"""Stage 2: front-door adjustment. Student/teacher heads trained by concept-aware contrast."""
from __future__ import annotations

from typing import Any

import torch

from modules.bank import ConceptBank
from modules.functional import contrastive_loss, stochastic_sampling, vector_quantize
from stages.artifacts import already_done, continue_from, input_records, load_codebook, save_artifact, \
    stage2_head_path
from stages.common import Run, linear_probe_loss, tokens_to_map
from stages.segments import build_segment, clip_norm, student_parameters
from stages.trainer import StepOutput, Trainer
from stages.validation import make_validation
from utils.distributed import all_gather_cat
from utils.io import read_provenance


def train_front_door(run: Run) -> None:
    args = run.args
    settings = {**run.shared_settings(), **run.head_settings(), **run.training_settings(),
                f"{args.stage}.clip": clip_norm(run), f"{args.stage}.load_segment": args.load_segment}
    artifact = run.paths.segment
    if already_done(run, artifact, settings):
        return
    trainer = build_trainer(run, settings, load_codebook(run))
    inputs = input_records(run)
    if args.load_segment:  # the stage-2 head: the copy stage 3 kept, once stage 3 rewrote the artifact
        kept = stage2_head_path(artifact)
        fine_tuned = artifact.is_file() and \
            str((read_provenance(artifact) or {}).get("stage", "")).startswith("fine_tuning")
        continue_from(run, trainer.stateful["segment"], kept if fine_tuned and kept.is_file() else artifact,
                      "segment head", "load_segment", f"front_door_{run.structure.lower()}",
                      {**run.shared_settings(), **run.head_settings()}, ("backbone", "codebook"))
    dataset = run.dataset("train", run.derived.train_resolution)
    trainer.fit(dataset, args.epoch, args.batch_size)
    save_artifact(run, trainer.stateful["segment"].state_dict(), artifact, settings, inputs)
    trainer.state.discard()


def build_trainer(run: Run, settings: dict[str, Any], codebook: torch.Tensor) -> Trainer:
    """Student/teacher heads, concept bank, optimizer and the one-step function of stage 2 over the
    stage-1 `codebook` (K, D), in the shared loop."""
    args = run.args
    segment = build_segment(run).to(run.device)
    segment.set_codebook(codebook)
    segment.train()  # dropout is active in student and teacher alike
    bank = ConceptBank(args.num_codebook, args.projection_dim).to(run.device)
    bank_rng = torch.Generator(device=run.device).manual_seed(args.seed)  # same on every rank
    params = student_parameters(segment)
    optimizer = torch.optim.Adam(params, lr=run.lr, weight_decay=run.derived.settings.weight_decay)
    gather = (lambda x: x) if run.recipe else all_gather_cat  # a recipe replica keeps its own bank
    n_classes = run.derived.n_classes

    def step(batch: dict) -> StepOutput:
        if run.recipe and trainer.global_step == 0:  # after any loading: --load_segment, --resume
            share_teacher_storage(segment)
        feat = run.train_features(batch)  # (B, N, D)
        if run.structure == "MLP":
            teacher_full = segment.head_ema(feat)  # (B, N, r), for the linear probe only
            if args.grid:
                feat, _ = stochastic_sampling(feat)  # (B, n, D)
            proj_ema = segment.projection_head_ema(segment.head_ema(feat))  # (B, n, p)
            proj = segment.projection_head(segment.head(feat))  # (B, n, p)
        else:
            teacher_full = segment.head_ema(feat)  # (B, N, r)
            proj_ema = segment.projection_head_ema(teacher_full)  # (B, N, p)
            proj = segment.projection_head(segment.head(feat))  # (B, N, p)
            if args.grid:
                feat, order = stochastic_sampling(feat)
                proj, _ = stochastic_sampling(proj, order=order)
                proj_ema, _ = stochastic_sampling(proj_ema, order=order)
        bank_index, bank_proj = bank.entries()
        loss_front = contrastive_loss(feat, proj.float(), proj_ema.float(), codebook, bank_index, bank_proj,
                                      published_fp16=run.recipe)
        logits = segment.linear(tokens_to_map(teacher_full.detach(), batch["img"], run.derived.patch_size))  # (B, C, h, w): labels never reach a head
        loss_linear, acc = linear_probe_loss(logits, batch["label"], n_classes)
        return StepOutput(loss=loss_front + loss_linear,
                          scalars={"contrastive": loss_front.detach(), "linear": loss_linear.detach(), "acc": acc},
                          extras={"feat": feat, "proj_ema": proj_ema.detach()})

    def after_step(out: StepOutput) -> None:
        separate_teacher_storage(segment)
        segment.ema_update(0.99)
        _, index = vector_quantize(out.extras["feat"], codebook)  # (B, n)
        bank.update(gather(index), gather(out.extras["proj_ema"].float()), generator=bank_rng)

    name = f"front_door_{run.structure.lower()}"
    trainer = Trainer(run, name, run.paths.segment.with_name(f"state_{name}.pth"), settings,
                      {"segment": segment, "bank": bank, "bank_rng": _GeneratorState(bank_rng)},
                      [optimizer], [], clip_params=params, clip_norm=clip_norm(run), step_fn=step,
                      after_step=after_step, probe_scalars=("linear", "acc"), validate=make_validation(run, segment))
    return trainer


def _teacher_pairs(segment) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(student, teacher) parameters of the head and the projection head."""
    return [(s, t) for student, teacher in ((segment.head, segment.head_ema),
                                            (segment.projection_head, segment.projection_head_ema))
            for s, t in zip(student.parameters(), teacher.parameters())]


def share_teacher_storage(segment) -> None:
    """The published start of stage 2 (`param_ema.data = param.data`, --published_recipe): each teacher
    parameter is the student's own tensor until the first EMA update, so the first optimizer step moves
    both and the teacher equals the stepped student after step 1."""
    for s, t in _teacher_pairs(segment):
        t.data = s.data


def separate_teacher_storage(segment) -> None:
    """Give a teacher parameter that shares the student's tensor its own copy, as the published EMA
    update (a new tensor) does; the in-place EMA then leaves the student untouched."""
    for s, t in _teacher_pairs(segment):
        if t.data_ptr() == s.data_ptr():
            t.data = s.data.clone()


class _GeneratorState:
    """Lets the trainer save and restore a torch.Generator like any other stateful object."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])
