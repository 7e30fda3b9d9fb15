"""Rows of the result table, the stages that make each row, and the flags every stage gets.

A row is everything that makes its numbers: dataset, backbone checkpoint, structure, K, p, batch size and
seed (Row), with the recipe and the stage flags after `--` of the call (Settings). Its stages: the mediator
(stage 1, shared by the MLP and TR rows of one setting), front-door (2), fine-tuning (3), the test, and the
k-means baseline on the same backbone (shared like stage 1, and by every K). Each stage's folder is
`<K>[_<variant>][_seed<N>]` (utils/config.py setting_folder), the variant naming p and the batch size
when they are not the dataset's defaults and a short hash of the result-changing flags after `--`; the
stage scripts compute the same folder from their own --num_codebook, --variant and --seed.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from loader.datasets_table import DATASETS, run_defaults
from utils.config import STAGE_EPOCHS, ArtifactPaths, build_parser, checkpoint_stem, dataset_folder, \
    setting_folder, stage_argv
from utils.errors import UserError

STRUCTURES = ("MLP", "TR")
TOY_BACKBONE = "random_vit_tiny_8"
# Run-wide flags reproduce.py sets on every stage itself (given after `--`, they would split the rows'
# artifacts from what status and table read).
OWN_FLAGS = ("--dataset", "--data_dir", "--ckpt", "--output_dir", "--results_dir", "--log_dir", "--num_codebook",
             "--projection_dim", "--batch_size", "--n_classes", "--published_recipe", "--resume", "--gpu", "--seed",
             "--variant", "--feature_cache")
# Flags after `--` that change how a stage runs, not what it makes: left out of the row's hash.
NOT_RESULT_FLAGS = ("--num_workers", "--crf_workers", "--save_images", "--save_every", "--dist_timeout", "--port",
                    "--max_nonfinite")
RECIPE_DIRS = {"default": ("CAUSE", "results", "logs"),
               "published": ("CAUSE_published", "results_published", "logs_published")}


def published_rows():
    """The published rows (`download.py list`): (dataset, backbone, structure, mIoU, pAcc) records."""
    from downloads.sources import PUBLISHED
    return PUBLISHED


def dataset_sources():
    """Download name -> where the dataset lives under --data_dir and the --dataset names it serves."""
    from downloads.sources import DATASET_SOURCES
    return DATASET_SOURCES


def known_backbones() -> list[str]:
    from downloads.sources import BACKBONES
    return list(BACKBONES)


@dataclass(frozen=True)
class Row:
    dataset: str
    ckpt: str                          # backbone checkpoint file (or Hugging Face model folder)
    structure: str                     # MLP | TR
    num_codebook: int | None = None    # K; None: the dataset's default (loader/datasets_table.py)
    projection_dim: int | None = None  # p; None: the dataset's default
    batch_size: int | None = None      # None: the dataset's default
    seed: int = 0

    @property
    def backbone(self) -> str:
        return checkpoint_stem(self.ckpt)

    @property
    def sizes(self) -> dict[str, int]:
        """K, p and batch size, the dataset's defaults filled in."""
        sizes = run_defaults(self.dataset)
        return {k: v if getattr(self, k) is None else getattr(self, k) for k, v in sizes.items()}

    @property
    def setting(self) -> tuple:
        """What the row's seeds share: every part of the row but the seed."""
        s = self.sizes
        return self.dataset, self.backbone, self.structure, s["num_codebook"], s["projection_dim"], s["batch_size"]

    @property
    def published(self):
        """The published record of this row, or None."""
        return next((r for r in published_rows()
                     if (r.dataset, r.backbone, r.structure) == (self.dataset, self.backbone, self.structure)), None)


@dataclass(frozen=True)
class Settings:
    """What every row of one reproduce.py call shares."""
    recipe: str                      # published | default
    data_dir: str
    output_dir: str
    results_dir: str
    log_dir: str
    num_codebook: tuple[int, ...] | None   # K of each row (a sweep); None: the dataset's default
    projection_dim: tuple[int, ...] | None
    batch_size: int | None
    n_classes: int | None            # directory datasets
    gpu: str | None
    feature_cache: str | None = None  # the training stages' --feature_cache (shared by every row and seed)
    passthrough: tuple[str, ...] = ()
    seed: tuple[int, ...] = (0,)

    def namespace(self, row: Row) -> argparse.Namespace:
        """The flags that place `row`'s artifacts (what ArtifactPaths reads)."""
        return argparse.Namespace(dataset=row.dataset, data_dir=self.data_dir, output_dir=self.output_dir,
                                  results_dir=self.results_dir, num_codebook=row.sizes["num_codebook"],
                                  seed=row.seed, variant=variant(row, self))


def variant(row: Row, settings: Settings) -> str:
    """The --variant of a row: `p<p>` and `b<batch>` where they are not the dataset's defaults, then the
    hash of the stage flags after `--` (flags_hash)."""
    defaults, sizes = run_defaults(row.dataset), row.sizes
    pieces = [f"{letter}{sizes[k]}" for letter, k in (("p", "projection_dim"), ("b", "batch_size"))
              if sizes[k] != defaults[k]]
    return "_".join(pieces + ([flags_hash(settings.passthrough)] if flags_hash(settings.passthrough) else []))


def flags_hash(passthrough: tuple[str, ...]) -> str:
    """`f` + 8 hex of the sha256 of the result-changing stage flags after `--` (sorted by flag, the last value
    of a repeated flag, `--flag=v` as `--flag v`); '' when there are none."""
    flags = {}
    for group in _split_passthrough(passthrough):
        flag, eq, value = group[0].partition("=")
        if flag not in NOT_RESULT_FLAGS:
            flags[flag] = [value] if eq else group[1:]
    if not flags:
        return ""
    text = "\n".join(f"{flag} {' '.join(flags[flag])}" for flag in sorted(flags))
    return "f" + hashlib.sha256(text.encode()).hexdigest()[:8]


def sweep(rows: list[Row], settings: Settings) -> list[Row]:
    """Each row crossed with the K, p and seed lists of the call (K, then p, then seed vary fastest last)."""
    def choices(values: tuple[int, ...] | None) -> tuple[int | None, ...]:
        return tuple(dict.fromkeys(values)) if values else (None,)
    return [Row(r.dataset, r.ckpt, r.structure, k, p, settings.batch_size, seed) for r in rows
            for k in choices(settings.num_codebook) for p in choices(settings.projection_dim)
            for seed in choices(settings.seed)]


@dataclass(frozen=True)
class Stage:
    script: str                 # e.g. train_front_door_tr (its file is <script>.py)
    name: str                   # job name: cause-<dataset>-<backbone>[-<folder>][-<structure>]-<script>
    artifact: Path              # present (and no state file): done
    state: Path | None          # resume state of a training stage
    argv: tuple[str, ...]       # flags of the script
    after: tuple[str, ...] = field(default=())  # names of the stages it waits for (afterok)
    epochs: int = 0             # epochs of a training stage (for status)


def select_rows(datasets: list[str] | None, structures: list[str] | None, ckpts: list[str] | None,
                ckpt_dir: str) -> list[Row]:
    """Rows from the selectors: without --ckpt the published rows of the datasets (toy: random_vit_tiny_8);
    with --ckpt every dataset x backbone x structure asked for, published or not."""
    for s in structures or []:
        if s not in STRUCTURES:
            raise UserError(f"--structure {s}: expected MLP or TR (a comma list)")
    for d in datasets or []:
        if d not in DATASETS:
            raise UserError(f"--dataset {d}: unknown, expected one of {', '.join(DATASETS)} (a comma list)")
    for c in ckpts or []:
        _check_backbone_name(c)
    structures = structures or list(STRUCTURES)
    if datasets is None:
        published = published_rows()
        datasets = list(dict.fromkeys(r.dataset for r in published))
    rows: list[Row] = []
    for d in datasets:
        if ckpts:
            rows += [Row(d, c, s) for c in ckpts for s in structures]
        elif d == "toy":
            rows += [Row(d, str(Path(ckpt_dir) / f"{TOY_BACKBONE}.pth"), s) for s in structures]
        elif d == "directory":
            raise UserError("--dataset directory: pass --ckpt (the backbones to train on your folder) and --data_dir")
        else:
            rows += [Row(d, str(Path(ckpt_dir) / f"{r.backbone}.pth"), r.structure) for r in published_rows()
                     if r.dataset == d and r.structure in structures]
    if not rows:
        raise UserError(f"no published row for --dataset {','.join(datasets)} --structure {','.join(structures)} "
                        f"(`python download.py list` shows them; pass --ckpt for others)")
    return rows


def _check_backbone_name(ckpt: str) -> None:
    name = checkpoint_stem(ckpt)
    if Path(ckpt).exists() or name.startswith("random_") or name in known_backbones():
        return
    raise UserError(f"--ckpt {ckpt}: unknown backbone {name!r}, expected a file named after one of "
                    f"{', '.join(known_backbones())} (`python download.py list`), or an existing checkpoint")


def check_inputs(rows: list[Row], settings: Settings) -> None:
    """Everything a stage would stop on at once, before anything is submitted: backbone files and datasets."""
    for ckpt in dict.fromkeys(r.ckpt for r in rows):
        name = checkpoint_stem(ckpt)
        if not Path(ckpt).exists() and not name.startswith("random_"):
            raise UserError(f"backbone checkpoint {ckpt} not found: python download.py backbone {name} "
                            f"--dest {Path(ckpt).parent}")
    for dataset in dict.fromkeys(r.dataset for r in rows):
        if dataset == "directory":
            if not Path(settings.data_dir).is_dir():
                raise UserError(f"--dataset directory: --data_dir {settings.data_dir} is not a folder")
            if settings.n_classes is None:
                raise UserError("--dataset directory: pass --n_classes (the classes of your labels)")
            continue
        source = next(((n, s) for n, s in dataset_sources().items() if dataset in s.serves), None)
        if source is not None and not (Path(settings.data_dir) / source[1].dest).is_dir():
            raise UserError(f"dataset {dataset} not found at {Path(settings.data_dir) / source[1].dest}: "
                            f"python download.py dataset {source[0]} --data_dir {settings.data_dir}")


def write_missing_toy_backbones(rows: list[Row]) -> None:
    """As `bash run`: a missing random_* backbone is written with random weights."""
    from models import save_random_checkpoint
    for ckpt in dict.fromkeys(r.ckpt for r in rows):
        name = checkpoint_stem(ckpt)
        if not Path(ckpt).exists() and name.startswith("random_"):
            print(f"[reproduce] writing a randomly initialised backbone to {ckpt}")
            save_random_checkpoint(name, ckpt)


def _split_passthrough(tokens: tuple[str, ...]) -> list[list[str]]:
    """`--flag value...` groups of the stage flags after `--`."""
    groups: list[list[str]] = []
    for t in tokens:
        if t.startswith("--"):
            groups.append([t])
        elif not groups:
            raise UserError(f"stage flags after --: expected a --flag first, got {t!r}")
        else:
            groups[-1].append(t)
    return groups


def _stage_parsers(scripts: list[str]) -> dict[str, argparse.ArgumentParser]:
    return {s: build_parser(s.removeprefix("train_"), DATASETS) for s in scripts}


def stage_flags(script: str, row: Row, settings: Settings) -> list[str]:
    """The flags of `script` for `row`: of the run-wide ones and those after `--`, the ones this script takes."""
    sizes = row.sizes
    argv = ["--dataset", row.dataset, "--data_dir", settings.data_dir, "--ckpt", row.ckpt,
            "--output_dir", settings.output_dir, "--results_dir", settings.results_dir, "--log_dir", settings.log_dir,
            "--num_codebook", str(sizes["num_codebook"]), "--projection_dim", str(sizes["projection_dim"]),
            "--batch_size", str(sizes["batch_size"]), "--seed", str(row.seed)]
    if variant(row, settings):
        argv += ["--variant", variant(row, settings)]
    if settings.n_classes is not None:
        argv += ["--n_classes", str(settings.n_classes)]
    if settings.recipe == "published":
        argv += ["--published_recipe", "true"]
    if settings.gpu:
        argv += ["--gpu", settings.gpu]
    if settings.feature_cache:  # only the training stages take it: stage_argv drops it for the others
        argv += ["--feature_cache", settings.feature_cache]
    argv += [token for group in _split_passthrough(settings.passthrough) for token in group]
    return stage_argv(script.removeprefix("train_"), argv)


def check_passthrough(settings: Settings, scripts: list[str]) -> None:
    """Every flag after `--` is one a stage accepts (and not one reproduce.py sets itself)."""
    parsers = _stage_parsers(scripts)
    for group in _split_passthrough(settings.passthrough):
        flag = group[0].split("=")[0]
        if flag in OWN_FLAGS:
            raise UserError(f"{flag} after --: give it to reproduce.py itself (before --), which passes it to "
                            f"every stage and reads the artifacts from it")
        if not any(flag in p._option_string_actions for p in parsers.values()):
            raise UserError(f"{flag} after --: no stage script accepts it (python train_mediator.py --help "
                            f"lists the flags)")


def row_stages(row: Row, settings: Settings) -> list[Stage]:
    """The stages of one row, in order: mediator, k-means baseline, front-door, fine-tuning, test."""
    ns = settings.namespace(row)
    paths = ArtifactPaths.of(ns, row.backbone, row.structure)
    tag = row.structure.lower()
    n_classes = settings.n_classes if row.dataset == "directory" else DATASETS[row.dataset].n_classes
    kmeans = Path(settings.results_dir) / dataset_folder(ns) / "KMEANS" / row.backbone / setting_folder(n_classes, ns)
    default_k = str(run_defaults(row.dataset)["num_codebook"])

    def named(folder: str, default: str) -> str:  # the published default keeps the job names it had
        return f"cause-{dataset_folder(ns)}-{row.backbone}" + ("" if folder == default else f"-{folder}")

    base, kmeans_base = named(paths.codebook.parent.name, default_k), named(kmeans.name, str(n_classes))

    def stage(script: str, name: str, artifact: Path, state: Path | None, after: tuple[str, ...] = ()) -> Stage:
        argv = stage_flags(script, row, settings)
        epochs = _epochs(script, settings) if state is not None else 0
        return Stage(script, name, artifact, state, tuple(argv), after, epochs)

    mediator = stage("train_mediator", f"{base}-train_mediator", paths.codebook,
                     paths.codebook.with_name("state_mediator.pth"))
    front = stage(f"train_front_door_{tag}", f"{base}-{row.structure}-train_front_door_{tag}", paths.segment,
                  paths.segment.with_name(f"state_front_door_{tag}.pth"), (mediator.name,))
    fine = stage(f"fine_tuning_{tag}", f"{base}-{row.structure}-fine_tuning_{tag}", paths.cluster,
                 paths.cluster.with_name(f"state_fine_tuning_{tag}.pth"), (front.name,))
    test = stage(f"test_{tag}", f"{base}-{row.structure}-test_{tag}", paths.results / "metrics.json", None,
                 (fine.name,))
    baseline = stage("test_kmeans", f"{kmeans_base}-test_kmeans", kmeans / "metrics.json", None)
    return [mediator, baseline, front, fine, test]


def _epochs(script: str, settings: Settings) -> int:
    groups = _split_passthrough(settings.passthrough)
    for g in groups:
        if g[0] == "--epoch" and len(g) > 1:
            return int(g[1])
        if g[0].startswith("--epoch="):
            return int(g[0].split("=", 1)[1])
    return STAGE_EPOCHS[script.removeprefix("train_")]


def validate_stage_flags(stages: list[Stage]) -> None:
    """Each stage's flags parse with its own parser (a bad value stops here, before anything runs)."""
    parsers = _stage_parsers(list(dict.fromkeys(s.script for s in stages)))
    for s in stages:
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
                parsers[s.script].parse_args(list(s.argv))
        except SystemExit:
            message = said.getvalue().strip().removeprefix("error: ").removesuffix(" (--help lists the flags)")
            raise UserError(f"{s.script}.py refuses its flags: {message}") from None
