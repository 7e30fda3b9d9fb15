"""Stage 3: fit the cluster probe (C, r) by modularity over the teacher's segment features."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from modules.functional import modularity_loss, stochastic_sampling
from modules.segment import Cluster, SegmentMLP, SegmentTR
from stages.artifacts import SCRIPTS, already_done, continue_from, input_paths, input_records, load_codebook, \
    load_state_dict_checked, rebuild_command, recorded_settings, save_artifact, stage2_head_path
from stages.common import Run, linear_probe_loss, require, tokens_to_map
from stages.segments import build_segment, clip_norm
from stages.trainer import StepOutput, Trainer
from stages.validation import make_validation
from utils.errors import UserError
from utils.io import atomic_write, file_record, file_sha256, read_provenance, save_json


def fine_tune(run: Run) -> None:
    args = run.args
    if not args.load_segment:
        raise UserError("--load_segment false: fine-tuning trains the cluster probe on the stage-2 segment head "
                        "and cannot start from an untrained one; drop the flag")
    settings = {**run.shared_settings(), **run.head_settings()}  # what the inputs must agree with
    own = {**settings, **run.training_settings(), "published_label_leak": args.published_label_leak,
           f"{args.stage}.clip": clip_norm(run, fine_tuning=True), f"{args.stage}.load_cluster": args.load_cluster}
    artifact = run.paths.cluster
    if already_done(run, artifact, own):
        return
    codebook = load_codebook(run)
    source, kept = stage2_head(run)
    segment = build_segment(run).to(run.device)
    load_state_dict_checked(run, segment, source, "segment head", f"front_door_{run.structure.lower()}",
                            settings, input_paths(run, "backbone", "codebook"))
    inputs = {role: v for role, v in input_records(run).items() if role != "segment"}
    started_from = {"path": str(kept.resolve()), "sha256": file_sha256(source)}
    trainer = build_trainer(run, own, segment, codebook)
    if args.load_cluster:
        cluster = trainer.stateful["cluster"]
        continue_from(run, cluster, run.paths.cluster, "cluster probe", "load_cluster",
                      f"fine_tuning_{run.structure.lower()}", settings, ("backbone", "codebook", "segment"))
        with torch.no_grad():
            cluster.codebook.copy_(codebook)  # the codebook stays the stage-1 one
    dataset = run.dataset("train", run.derived.train_resolution)
    trainer.fit(dataset, args.epoch, args.batch_size)
    # The segment file keeps the front-door settings it was made with, plus this stage's, and records the
    # stage-2 file it started from; the cluster probe records the segment file written here.
    save_artifact(run, segment.state_dict(), run.paths.segment, {**recorded_settings(source), **own},
                  {**inputs, "front_door_segment": started_from})
    save_artifact(run, trainer.stateful["cluster"].state_dict(), artifact, own,
                  {**inputs, "segment": file_record(run.paths.segment)})
    trainer.state.discard()


def stage2_head(run: Run) -> tuple[Path, Path]:
    """(file to load, file to record) of the stage-2 head this stage starts from, on every run.

    `segment_<tag>.pth` written by stage 2 is copied (with its JSON) to `segment_<tag>.front_door.pth`
    before this stage first rewrites it, and loaded; once rewritten by stage 3, the kept copy is loaded,
    so a rerun never fine-tunes a fine-tuned head again. A file without a JSON (a published download
    holds a fine-tuned head) or a fine-tuned one whose stage-2 head was not kept is refused."""
    tag = run.structure.lower()
    published, kept = run.paths.segment, stage2_head_path(run.paths.segment)
    require(published, "segment head", f"train_front_door_{tag}.py")
    record = read_provenance(published)
    stage = (record or {}).get("stage")
    retrain = rebuild_command(run, f"front_door_{tag}")
    if stage == f"front_door_{tag}":
        if run.dist.is_main and not (kept.is_file() and file_sha256(kept) == file_sha256(published)):
            atomic_write(kept, lambda tmp: shutil.copyfile(published, tmp))
            save_json({**record, "artifact": kept.name}, kept.with_suffix(".json"))
            run.log(f"kept the stage-2 head {published} as {kept}: every run of this stage starts from it")
        return published, kept
    if stage == f"fine_tuning_{tag}" and kept.is_file():
        return kept, kept
    if stage == f"fine_tuning_{tag}":
        raise UserError(f"{published} was already fine-tuned by {SCRIPTS[f'fine_tuning_{tag}']} and the stage-2 "
                        f"head it started from was not kept ({kept} is missing: made by an older version); "
                        f"train the stage-2 head again: {retrain}")
    raise UserError(f"{published} has no provenance JSON of {SCRIPTS[f'front_door_{tag}']} (a published download "
                    f"is an already fine-tuned head): fine-tuning starts from a stage-2 head; train one: {retrain}")


def build_trainer(run: Run, settings: dict[str, Any], segment: SegmentMLP | SegmentTR,
                  codebook: torch.Tensor) -> Trainer:
    """Cluster probe, optimizers and the one-step function of stage 3 over the stage-2 `segment` and
    stage-1 `codebook` (K, D), in the shared loop."""
    args = run.args
    segment.set_codebook(codebook)
    segment.train()  # dropout on in the teacher, as in the published fine-tuning
    cluster = Cluster(run.derived.embed_dim, args.reduced_dim, args.num_codebook, run.derived.n_classes).to(run.device)
    with torch.no_grad():
        cluster.codebook.copy_(codebook)
    cluster.codebook.requires_grad_(False)

    if args.published_label_leak:
        # The published script trains head_ema through the linear probe's cross-entropy.
        segment.head_ema.requires_grad_(True)
        run.log("warning: --published_label_leak true: label gradients train the teacher head (not unsupervised)")
    segment_params = [p for p in segment.parameters() if p.requires_grad]
    lr = run.lr
    opt_segment = torch.optim.Adam(segment_params, lr=lr, weight_decay=run.derived.settings.weight_decay)
    opt_cluster = torch.optim.Adam([cluster.cluster_probe], lr=lr)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt_segment, opt_cluster)]
    n_classes = run.derived.n_classes

    def step(batch: dict) -> StepOutput:
        feat = run.train_features(batch)  # (B, N, D)
        teacher = segment.head_ema(feat)  # (B, N, r)
        sampled = stochastic_sampling(teacher)[0] if args.grid else teacher  # (B, n, r)
        loss_mod = modularity_loss(cluster.cluster_probe, sampled.detach().float(), published_fp16=run.recipe)
        probe_input = teacher if args.published_label_leak else teacher.detach()
        loss_linear, acc = linear_probe_loss(
            segment.linear(tokens_to_map(probe_input, batch["img"], run.derived.patch_size)), batch["label"], n_classes)
        return StepOutput(loss=loss_mod + loss_linear,
                          scalars={"modularity": loss_mod.detach(), "linear": loss_linear.detach(), "acc": acc})

    name = f"fine_tuning_{run.structure.lower()}"
    return Trainer(run, name, run.paths.cluster.with_name(f"state_{name}.pth"), settings,
                   {"segment": segment, "cluster": cluster}, [opt_segment, opt_cluster], schedulers,
                   clip_params=segment_params, clip_norm=clip_norm(run, fine_tuning=True), step_fn=step,
                   probe_scalars=("linear", "acc"), validate=make_validation(run, segment, cluster.cluster_probe))
