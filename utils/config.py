"""The one flag parser of every script, and the artifact layout it implies."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from utils.errors import UserError, did_you_mean
from utils.hf_hub import is_hub_id, resolve_hub_id


# Epochs of each stage in the published scripts.
STAGE_EPOCHS = {"mediator": 1, "front_door_mlp": 2, "front_door_tr": 2, "fine_tuning_mlp": 1,
                "fine_tuning_tr": 5, "test_mlp": 0, "test_tr": 0, "test_kmeans": 0, "segment_images": 0}


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("yes", "true", "t", "y", "1"):
        return True
    if v in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/yes/no), got {value!r}")


class Bounded:
    """argparse `type=` for a number within [lo, hi] (either end may be open: None); the range shows in --help."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, above: bool = False):
        self.kind, self.lo, self.hi, self.above = kind, lo, hi, above  # above: lo itself excluded
        self.__name__ = kind.__name__  # argparse names the type in "invalid <type> value"

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{noun} in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"{noun} {'>' if self.above else '>='} {self.lo}"
        return f"{noun} <= {self.hi}" if self.hi is not None else noun

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        low_ok = self.lo is None or (value > self.lo if self.above else value >= self.lo)
        if not math.isfinite(value) or not low_ok or (self.hi is not None and value > self.hi):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text}")
        return value


def auto_only(value: str) -> str:
    """argparse `type=` of `--resume auto` (plain `--resume` takes no value)."""
    if value != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {value!r}")
    return value


def bounded_int(lo: int | None = None, hi: int | None = None) -> Bounded:
    return Bounded(int, lo, hi)


def positive_float() -> Bounded:
    return Bounded(float, 0.0, above=True)


class DefaultsFormatter(argparse.HelpFormatter):
    """--help with every flag's default: ` (default: X)` is appended unless the help states it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        value = str(action.default).lower() if isinstance(action.default, bool) else str(action.default)
        return f"{text} (default: {value.replace('%', '%%')})"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `error: argument --flag: ...`, exit 2 (no usage block),
    and whose --help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (--help lists the flags)\n")

    def _check_value(self, action: argparse.Action, value: object) -> None:
        """A value outside the choices: the one line names the closest choice too (a typo in --dataset)."""
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices})"
                                                 f"{did_you_mean(str(value), action.choices)}")


def show_ranges(parser: argparse.ArgumentParser) -> None:
    """Append each bounded flag's range to its help text."""
    for action in parser._actions:
        if isinstance(action.type, Bounded) and action.help:
            action.help += f" [{action.type.describe()}]"


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


# Which scripts take which flags: each script offers only the flags its code reads.
STAGES = tuple(STAGE_EPOCHS)
TRAINING = ("mediator", "front_door_mlp", "front_door_tr", "fine_tuning_mlp", "fine_tuning_tr")
FRONT_DOOR, FINE_TUNING = ("front_door_mlp", "front_door_tr"), ("fine_tuning_mlp", "fine_tuning_tr")
TESTS = ("test_mlp", "test_tr", "test_kmeans")
TRAINED_HEAD = ("test_mlp", "test_tr", "segment_images")     # load a trained segment head and cluster probe
HEADS = FRONT_DOOR + FINE_TUNING + TRAINED_HEAD               # build a segment head
LOADERS = TRAINING + TESTS                                   # read a dataset split through a DataLoader
NOT_KMEANS = tuple(s for s in STAGES if s != "test_kmeans")  # every script with artifacts under --output_dir


SEED_HELP = {"training": "seeds sampling, dropout, initialisation and data order; seeds other than 0 get folders "
                         "of their own (<K>_seed<N>)",
             "test_kmeans": "seeds the k-means initialisation and the sampled patch features; seeds other than 0 "
                            "get a folder of their own (<C>_seed<N>)",
             "trained": "the seed the artifacts were trained with: selects their folder (<K>_seed<N>)"}


def _seed_role(stage: str) -> str:
    return "trained" if stage in TRAINED_HEAD else stage if stage == "test_kmeans" else "training"


def variant_name(text: str) -> str:
    """argparse `type=` of --variant: a folder-name piece (letters, digits, `.`, `-`, `_`), or empty."""
    if not re.fullmatch(r"[A-Za-z0-9._-]*", text) or text.startswith("."):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '-' or '_' (a folder-name piece), got {text!r}")
    return text


def build_parser(stage: str, datasets: Sequence[str]) -> argparse.ArgumentParser:
    """The flags of `stage`'s script (upstream names and defaults, plus --device, --seed, --output_dir and the
    reliability flags): only those its code reads.

    `datasets`: the names --dataset accepts (the loader's table, `loader.datasets_table.DATASETS`).
    """
    if stage not in STAGE_EPOCHS:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    p = OneLineParser(description=f"CAUSE {stage.replace('_', ' ')}")

    def add(group: argparse._ArgumentGroup, stages: Sequence[str], *names: str, **kwargs) -> None:
        if stage in stages:
            group.add_argument(*names, **kwargs)

    data = p.add_argument_group("data and backbone")
    data.add_argument("--dataset", default="cocostuff27", choices=sorted(datasets),
                      help="which dataset (loader/datasets_table.py)")
    data.add_argument("--data_dir", default="data", help="dataset root (STEGO layout); for 'directory', your folder")
    data.add_argument("--n_classes", type=bounded_int(1), default=None, help="classes of a 'directory' dataset (default: the largest label id + 1; "
                      "without labels, 27)")
    data.add_argument("--skip_bad_images", type=str2bool, default=False,
                      help="decode every image and label first and leave out (list, and record in the JSON) "
                           "unusable ones instead of stopping on the first (the directory dataset is always "
                           "checked; others only with this flag)")
    data.add_argument("--ckpt", default="checkpoint/dino_vit_base_8.pth",
                      help="backbone: a checkpoint file (its name, <family>_vit_<size>_<patch>.pth or the official "
                           "release name, selects the model) or a Hugging Face model folder")
    data.add_argument("--published_12_heads", type=str2bool, default=None,
                      help="build DINO ViT-S with 12 heads as the published code does "
                           "(needed for the published ViT-S heads; default: false, true under --published_recipe)")
    add(data, TRAINING + ("test_tr", "segment_images"), "--train_resolution", type=bounded_int(1), default=None,
        help="training image size (default: per dataset and structure, loader/datasets_table.py; DINOv2 rounds "
             "to 322)")
    add(data, ("front_door_mlp", "fine_tuning_mlp") + TESTS + ("segment_images",), "--test_resolution",
        type=bounded_int(1), default=None, help="evaluation image size (default: 320, DINOv2 322)")
    add(data, LOADERS, "--num_workers", type=bounded_int(0), default=default_num_workers(),
        help="data-loading processes (default: min(8, CPUs - 1))")
    add(data, LOADERS, "--batch_size", type=bounded_int(1), default=16, help="images per process and step")

    model = p.add_argument_group("model")
    add(model, NOT_KMEANS, "--num_codebook", type=bounded_int(1), default=2048,
        help="K, concepts of the mediator codebook")
    add(model, HEADS, "--reduced_dim", type=bounded_int(1), default=90, help="r, width of the segment features")
    add(model, HEADS, "--projection_dim", type=bounded_int(1), default=2048,
        help="p, width of the contrastive projection")
    add(model, TRAINING, "--grid", type=str2bool, default=True, help="stochastic 4x4 grid sampling")
    add(model, FRONT_DOOR, "--load_segment", type=str2bool, default=False,
        help="start from the existing segment head of this stage's output path instead of a "
             "fresh one (needs --overwrite, which replaces it)")
    add(model, FINE_TUNING, "--load_segment", type=str2bool, default=True,
        help="fine-tune the stage-2 segment head (the only choice: false is refused)")
    add(model, FINE_TUNING, "--load_cluster", type=str2bool, default=False,
        help="start from the existing cluster probe of this stage's output path instead of a "
             "fresh one (needs --overwrite, which replaces it)")

    train = p.add_argument_group("training")
    add(train, TRAINING, "--epoch", type=bounded_int(0), default=STAGE_EPOCHS[stage],
        help="epochs of this stage (published default; 0 saves the untrained artifact, a baseline)")
    add(train, TRAINING, "--lr", type=positive_float(), default=1e-3,
        help="per-process learning rate; scaled by the world size (by 4 under --published_recipe)")
    add(train, TRAINING, "--max_steps", type=bounded_int(0), default=None,
        help="stop each epoch after this many steps (quick runs; 0: no training, a baseline; default: "
             "the whole epoch)")
    train.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0, help=SEED_HELP[_seed_role(stage)])
    add(train, FINE_TUNING, "--published_label_leak", type=str2bool, default=None,
        help="let the linear probe's label gradient train the teacher head, "
             "as the published code does (default: false, true under --published_recipe)")
    train.add_argument("--published_recipe", type=str2bool, default=False,
                       help="train as the published runs did (rank 0 of 4 unsynchronised replicas): lr x 4, "
                            "rank 0's shard of a 4-way DistributedSampler split, own concept bank, fp16 with "
                            "the published loss precision, 12-head DINO ViT-S, label leak, published clipping; "
                            "evaluating, pass it as the artifacts were trained")
    add(train, FRONT_DOOR + FINE_TUNING, "--validate", type=str2bool, default=True,
        help="score the val split after every epoch, as the published scripts do (linear "
             "probe; fine-tuning also the cluster probe)")
    add(train, FRONT_DOOR + FINE_TUNING, "--val_images", type=bounded_int(1), default=None,
        help="validate on the first N val images only (quick runs; default: all)")
    add(train, TRAINING, "--save_every", type=bounded_int(0), default=0,
        help="also save the resumable state every N steps (0: epoch ends only)")
    add(train, TRAINING, "--resume", nargs="?", const=True, default=False, type=auto_only, metavar="auto",
        help="continue an interrupted run from its saved state; `--resume auto`: continue when a "
             "state is saved, else run as without it (what `bash run` and a requeued job pass)")
    overwrite_help = {"test_kmeans": "fit k-means again although metrics.json holds the baseline of these settings",
                      "test_mlp": "replace the results of another model or other settings in the results folder "
                                  "(its earlier outputs are removed first)"}
    add(train, TRAINING + TESTS, "--overwrite", action="store_true",
        help=overwrite_help.get(stage.replace("test_tr", "test_mlp"), "replace an existing artifact of this stage"))
    add(train, TRAINING, "--feature_cache", default=None, metavar="DIR",
        help="compute the frozen backbone's training features once and read them back in later steps, epochs, "
             "stages, rows and seeds (docs/feature-cache.md; default: none, the backbone runs every step)")
    add(train, TRAINING, "--feature_cache_dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
        help="how --feature_cache stores the features: fp32 is exact (a row equals the row trained without the "
             "cache); fp16/bf16 halve the disk and round the features the stage trains on")
    add(train, TRAINING, "--max_nonfinite", type=bounded_int(1), default=5,
        help="stop after this many non-finite losses in a row")

    ev = p.add_argument_group("evaluation")
    add(ev, TESTS, "--crf_workers", type=bounded_int(0), default=None,
        help="CRF processes (default: CPU count; 0: serial)")
    add(ev, TESTS + ("segment_images",), "--results_dir", default="results",
        help="where test scripts write pictures and metrics.json" if stage != "segment_images"
        else "where test_{mlp,tr}.py wrote metrics.json (read by --matched)")
    add(ev, TESTS, "--save_images", type=bounded_int(-1), default=-1,
        help="write pictures and raw maps for images with index below this (-1: all, 0: none)")
    add(ev, TRAINED_HEAD, "--segment", default=None,
        help="segment head file (default: segment_{mlp,tr}.pth under --output_dir)")
    add(ev, TRAINED_HEAD, "--cluster", default=None,
        help="cluster file (default: cluster_{mlp,tr}.pth under --output_dir)")
    add(ev, ("test_kmeans",), "--kmeans_samples", type=bounded_int(1), default=200_000,
        help="patch features of the val split sampled (evenly per image) to fit k-means")
    if stage == "segment_images":
        inf = p.add_argument_group("inference on your images")
        inf.add_argument("--input", required=True, help="an image, a folder of images, or a .txt list of image paths")
        inf.add_argument("--out", required=True,
                         help="folder for <name>_seg.png, <name>_overlay.png, <name>_labels.png")
        inf.add_argument("--model", default=None,
                         help="folder of a trained model (its segment_<mlp|tr>.pth, cluster_<mlp|tr>.pth and their "
                              "JSONs): the model's settings (dataset, data_dir, ckpt, num_codebook, ...) come from "
                              "there; flags given as well must agree (default: the model the flags name)")
        inf.add_argument("--structure", default="TR", choices=["MLP", "TR"],
                         help="which trained head to load; with --model, the one the folder holds (default: TR)")
        inf.add_argument("--crf", type=str2bool, default=False,
                         help="refine with the dense CRF (flip-averaged features)")
        inf.add_argument("--matched", type=str2bool, default=False,
                         help="map clusters to classes with the assignment in the test split's metrics.json")

    run = p.add_argument_group("devices and outputs")
    run.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA when present")
    run.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                     help="autocast dtype (fp16 with a loss scaler); auto: bf16 on CUDA with bf16, fp16 on "
                          "other CUDA GPUs, fp32 on CPU; fp16 under --published_recipe")
    run.add_argument("--gpu", default=None, help="GPU indices, e.g. 0,1,2,3 (one process per GPU; default: none, "
                                                 "CPU or the first GPU)")
    run.add_argument("--distributed", type=str2bool, default=None,
                     help="spawn one process per --gpu entry (default: when more than one GPU is given)")
    run.add_argument("--port", type=bounded_int(1, 65535), default=12355,
                     help="rendezvous port of the processes spawned from --gpu")
    run.add_argument("--dist_timeout", type=positive_float(), default=1800.0,
                     help="seconds a rank waits for the others")
    add(run, NOT_KMEANS, "--output_dir", default="CAUSE", help="root of the artifacts (codebook, heads, probe)")
    run.add_argument("--variant", type=variant_name, default="",
                     help="extra name of this setting's folders, <K>_<variant>[_seed<N>] (reproduce.py passes p, "
                          "batch and a hash of the stage flags after --; every stage of one setting needs the same)")
    add(run, TRAINING, "--log_dir", default="logs", help="TensorBoard scalars")
    show_ranges(p)
    return p


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The flags (`dest` names) that `argv` gives, whatever their values: parsed once more with no defaults."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults.items():
            action.default = default


def stage_argv(stage: str, argv: Sequence[str]) -> list[str]:
    """The flags of `argv` (each with its value) that `stage`'s script takes, in their order: `bash run`
    hands one set of flags to every stage. A flag that no script takes is refused (UserError)."""
    takes = {o for a in build_parser(stage, ())._actions for o in a.option_strings}
    nargs = {o: a.nargs for s in STAGES for a in build_parser(s, ())._actions for o in a.option_strings}
    kept, i = [], 0
    while i < len(argv):
        flag, eq, _ = argv[i].partition("=")
        if flag not in nargs or not flag.startswith("--"):
            raise UserError(f"{argv[i]}: no script takes this flag (each script's --help lists its flags)")
        # a value follows unless the flag takes none, or takes one optionally (--resume [auto]) and none is given
        optional_absent = nargs[flag] == "?" and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        width = 2 if nargs[flag] != 0 and not eq and not optional_absent else 1
        if flag in takes:
            kept += argv[i:i + width]
        i += width
    return kept


@dataclass(frozen=True)
class ArtifactPaths:
    """The published code's artifact layout under --output_dir and --results_dir. Each path reads only the
    flags it needs, so a script asks only for the paths of the flags it takes."""
    args: argparse.Namespace
    backbone_name: str
    structure: str | None

    @staticmethod
    def of(args: argparse.Namespace, backbone_name: str, structure: str | None) -> "ArtifactPaths":
        return ArtifactPaths(args, backbone_name, structure)

    def _artifact(self, *parts: str) -> Path:
        base = Path(self.args.output_dir) / dataset_folder(self.args)
        return base.joinpath(*parts[:-1], self.backbone_name, setting_folder(self.args.num_codebook, self.args),
                             parts[-1])

    @property
    def codebook(self) -> Path:
        return self._artifact("modularity", "modular.npy")

    @property
    def segment(self) -> Path:
        return self._artifact(f"segment_{(self.structure or 'mlp').lower()}.pth")

    @property
    def cluster(self) -> Path:
        return self._artifact(f"cluster_{(self.structure or 'mlp').lower()}.pth")

    @property
    def results(self) -> Path:
        return Path(self.args.results_dir) / dataset_folder(self.args) / (self.structure or "MLP") / \
            self.backbone_name / setting_folder(self.args.num_codebook, self.args)


def setting_folder(size: int, args: argparse.Namespace) -> str:
    """The folder of one setting under <backbone>/: `<size>` (K; C for the k-means baseline), then
    `_<--variant>` and `_seed<N>` when given. Seed 0 and no variant: the published layout, `<size>`."""
    variant, seed = getattr(args, "variant", ""), getattr(args, "seed", 0)
    return f"{size}" + (f"_{variant}" if variant else "") + (f"_seed{seed}" if seed else "")


def dataset_folder(args: argparse.Namespace) -> str:
    """The dataset's folder under --output_dir and --results_dir: its name (the published paths), or for
    `directory` `directory_<folder name>_<8 hex of the resolved folder's sha256>`, so that two folders
    never share an artifact."""
    if args.dataset != "directory":
        return args.dataset
    folder = Path(args.data_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name) or "root"
    return f"directory_{name}_{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"


def checkpoint_stem(ckpt: str) -> str:
    """The backbone's name in artifact paths: the file's stem, or for a Hugging Face id its id and revision."""
    if is_hub_id(ckpt):
        return resolve_hub_id(str(ckpt)).artifact_name
    return Path(ckpt).name.split(".")[0]


if __name__ == "__main__":  # python -m utils.config STAGE FLAG...: the flags STAGE takes, NUL-separated (bash run)
    import sys

    try:
        sys.stdout.write("".join(f"{a}\0" for a in stage_argv(sys.argv[1], sys.argv[2:])))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
