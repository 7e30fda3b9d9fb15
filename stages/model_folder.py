"""A trained model named by its folder (`segment_images.py --model`, `load_segmenter(model=...)`), and the trained
models under --output_dir that a run whose head is missing may have meant.

The folder is the one that holds `segment_<mlp|tr>.pth` and `cluster_<mlp|tr>.pth`, whatever its name; every
setting comes from the provenance JSON beside the cluster probe (`cluster_<mlp|tr>.json`): its "settings"
(dataset, data folder, backbone, K, r, p, classes, structure, TR's training resolution, the published switches),
its "flags" and its "upstream" file records (the backbone's resolved path). The folder's name is never parsed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.hf_hub import is_hub_id
from utils.io import read_json

STRUCTURES = ("MLP", "TR")
# settings of a trained model, as flags of segment_images.py / keyword arguments of load_segmenter
MODEL_FLAGS = ("dataset", "data_dir", "ckpt", "n_classes", "num_codebook", "reduced_dim", "projection_dim",
               "train_resolution", "structure", "published_12_heads", "published_recipe")
SHOWN_ALTERNATIVES = 3


def spell(caller: str, key: str, value: Any) -> str:
    """A flag as the caller writes it: `--key value` (scripts) or `key=value` (load_segmenter)."""
    if caller == "load_segmenter":
        return f"{key}={value!r}"
    return f"--{key} {str(value).lower() if isinstance(value, bool) else value}"


def heads_in(folder: Path) -> list[str]:
    """The structures whose segment head and cluster probe both lie in `folder`."""
    return [s for s in STRUCTURES if (folder / f"segment_{s.lower()}.pth").is_file()
            and (folder / f"cluster_{s.lower()}.pth").is_file()]


def model_record(folder: Path, structure: str) -> dict[str, Any]:
    """The provenance JSON of the folder's cluster probe of `structure`; UserError when it has none."""
    path = folder / f"cluster_{structure.lower()}.json"
    record = read_json(path, "provenance file")
    if record is None or not isinstance(record.get("settings"), dict):
        raise UserError(f"{path.absolute()} not found: the model's settings cannot be read (a published download "
                        f"has no provenance JSON); name the model by its flags instead of the folder")
    return record


def model_values(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """The trained model's value of each of MODEL_FLAGS (None where the flag has no value for it: an MLP head
    records no training resolution, since it runs at any size)."""
    settings = record["settings"]
    missing = [k for k in ("dataset", "num_codebook", "reduced_dim", "projection_dim", "structure", "n_classes")
               if k not in settings]
    if missing:
        raise UserError(f"{path.absolute()} records no {', '.join(missing)} (made by an older version): name the "
                        f"model by its flags instead of the folder")
    values = {k: settings.get(k) for k in MODEL_FLAGS}
    values["ckpt"] = backbone_of(record)
    if settings["dataset"] != "directory":  # a named dataset: its own class count; its folder is not read
        values["n_classes"] = values["data_dir"] = None
    return values


def backbone_of(record: dict[str, Any]) -> str | None:
    """The backbone the model was trained on: a Hugging Face id as given, else the resolved path of the file
    (a model folder for its model.safetensors) that the upstream record names."""
    given = record.get("flags", {}).get("ckpt")
    if given is not None and is_hub_id(given):
        return str(given)
    made_from = record.get("upstream", {}).get("backbone", {}).get("path")
    if made_from is None:
        return given
    path = Path(made_from)
    return str(path.parent if path.name == "model.safetensors" else path)


def apply_model_folder(args: argparse.Namespace, given: set[str], caller: str) -> None:
    """Set `args` (segment_images' flags) from the model folder `args.model`: the settings of its JSON, and
    `segment` / `cluster` to its files. A flag the caller gave too (`given`) must agree, or UserError."""
    folder = Path(args.model)
    if not folder.is_dir():
        raise UserError(f"model folder {folder.absolute()} not found: expected the folder holding "
                        f"segment_<mlp|tr>.pth and cluster_<mlp|tr>.pth of a trained model")
    heads = heads_in(folder)
    if "structure" in given and args.structure not in heads:
        raise UserError(f"{folder.absolute()} holds no CAUSE-{args.structure} model "
                        f"(segment_{args.structure.lower()}.pth and cluster_{args.structure.lower()}.pth); "
                        + (f"it holds {' and '.join(heads)}" if heads else "it holds none"))
    if not heads:
        raise UserError(f"{folder.absolute()} holds no trained model: expected segment_<mlp|tr>.pth and "
                        f"cluster_<mlp|tr>.pth (written by fine_tuning_<mlp|tr>.py)")
    if "structure" not in given and len(heads) > 1:
        raise UserError(f"{folder.absolute()} holds a CAUSE-MLP and a CAUSE-TR model: pass "
                        f"{spell(caller, 'structure', 'MLP')} or {spell(caller, 'structure', 'TR')}")
    structure = args.structure if "structure" in given else heads[0]
    for flag in ("segment", "cluster"):
        if flag in given:
            raise UserError(f"{spell(caller, flag, getattr(args, flag))} and a model folder: the folder "
                            f"names the files; pass one or the other")
    path = folder / f"cluster_{structure.lower()}.json"
    record = model_record(folder, structure)
    values = model_values(record, path)
    values["structure"] = structure
    disagree = [key for key, value in values.items() if key in given and not _same(key, getattr(args, key), value)]
    if disagree:
        key = disagree[0]
        raise UserError(f"{spell(caller, key, getattr(args, key))} disagrees with the model in "
                        f"{folder.absolute()}, trained with {spell(caller, key, values[key])} ({path.name}); drop "
                        f"it: the model folder sets every trained setting")
    if values["ckpt"] is not None and not is_hub_id(values["ckpt"]) and not Path(values["ckpt"]).exists():
        if "ckpt" not in given:
            raise UserError(f"the backbone {values['ckpt']} that {path.name} records is not there any "
                            f"more: pass {spell(caller, 'ckpt', '<where it is now>')} (its sha256 is checked)")
        values["ckpt"] = args.ckpt
    for key, value in values.items():
        if key not in given and value is not None:
            setattr(args, key, value)
    test_resolution = record.get("flags", {}).get("test_resolution")
    if "test_resolution" not in given and test_resolution is not None:
        args.test_resolution = test_resolution
    args.segment = str(folder / f"segment_{structure.lower()}.pth")
    args.cluster = str(folder / f"cluster_{structure.lower()}.pth")


def _same(key: str, given: Any, trained: Any) -> bool:
    """Whether a flag's given value means the trained one (paths by where they resolve)."""
    if key in ("ckpt", "data_dir") and given is not None and trained is not None:
        if key == "ckpt" and not Path(str(trained)).exists() and not is_hub_id(str(trained)):
            return True  # the backbone moved: the given one is checked by its sha256
        return str(given) == str(trained) or Path(str(given)).resolve() == Path(str(trained)).resolve()
    return given == trained


def trained_elsewhere(output_dir: Path, structure: str, current: dict[str, Any], caller: str,
                      model_flag: bool) -> str:
    """" ; a trained model exists in <folder> (<flags that reach it>): pass ..." for the models under
    `output_dir` of this dataset and structure whose settings differ from `current` (MODEL_FLAGS values of this
    run), fewest differences first; "" when there is none."""
    found: list[tuple[int, Path, list[str]]] = []
    for json_path in sorted(Path(output_dir).rglob(f"cluster_{structure.lower()}.json")):
        folder = json_path.parent
        if structure not in heads_in(folder):
            continue
        try:
            values = model_values(model_record(folder, structure), json_path)
        except UserError:
            continue
        if values["dataset"] != current["dataset"]:
            continue
        diffs = [spell(caller, k, values[k]) for k in MODEL_FLAGS
                 if values[k] is not None and k in current and not _same(k, current[k], values[k])]
        if diffs:
            found.append((len(diffs), folder, diffs))
    if not found:
        return ""
    found.sort(key=lambda f: (f[0], str(f[1])))
    shown = [f"{folder} ({' '.join(diffs)})" for _, folder, diffs in found[:SHOWN_ALTERNATIVES]]
    first = found[0][1]
    those = "those arguments" if caller == "load_segmenter" else "those flags"
    how = f"pass {spell(caller, 'model', str(first))}, or {those}" if model_flag else f"pass {those}"
    return f"; a trained model of these data exists under other settings in {'; '.join(shown)}: {how}"
