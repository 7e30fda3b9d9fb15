"""Reading backbone checkpoint files and Hugging Face model folders (strictly: every backbone weight
accounted for) and writing randomly initialised ones in the official layouts."""

import os
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from models.build import Backbone, build_spec_backbone
from models.hf import read_hf_folder
from models.layouts import extract_backbone, guess_family, wrap_backbone
from models.spec import EXTRA_TOKENS, BackboneSpec, make_spec, name_from_stem, parse_backbone_name, size_for_embed_dim
from utils.errors import UserError, closest
from utils.hf_hub import is_hub_id, resolve_hub_id
from utils.io import save_torch

_PATCH_KEY = "patch_embed.proj.weight"
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_LISTED = 5  # keys named in one error line


def read_checkpoint(path: Path) -> object:
    """The unpickled file on CPU; UserError naming the file if it cannot be read.

    Tries a weights-only load first; a file that also pickles plain Python objects (training
    states such as MSN's) is then unpickled in full, as the upstream code always does.
    """
    if not path.is_file():
        raise UserError(f"{Path(path).resolve()}: no such checkpoint file{_nearby(Path(path))} (get an official "
                        f"backbone with `python download.py backbone NAME`; `python download.py list` names them)")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot read the checkpoint (truncated or corrupt?): {reason}") from err


def _nearby(path: Path) -> str:
    """" (did you mean '<folder>/<name>'?)" for the file of the same folder whose name is closest to `path`'s."""
    names = sorted(p.name for p in path.parent.iterdir() if p.is_file()) if path.parent.is_dir() else []
    name = closest(path.name, names)
    return f" (did you mean {str(path.parent / name)!r}?)" if name else ""


def _file_dims(weights: dict[str, Tensor]) -> tuple[int, int] | None:
    """(embed dim, patch) of the patch embedding in `weights`, if it looks like a ViT one."""
    proj = weights.get(_PATCH_KEY)
    if proj is None or proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        return None
    return proj.shape[0], proj.shape[2]


def _block_count(weights: dict[str, Tensor]) -> int:
    indices = {int(m[1]) for k in weights if (m := _BLOCK.match(k))}
    return max(indices) + 1 if indices else 0


def _infer_spec(obj: object, path: Path) -> BackboneSpec:
    """Family from the file layout, size and patch from the patch embedding, depth from the blocks
    in the file, registers and DINOv3's S+ from their tensors."""
    hint = "name the file like dino_vit_small_8.pth or pass name="
    family = guess_family(obj)
    if family is None:
        raise UserError(f"{path}: could not infer the backbone family from the file layout; {hint}")
    weights = extract_backbone(obj, family, str(path))
    dims = _file_dims(weights)
    if dims is None:
        raise UserError(f"{path}: could not infer size and patch: no usable '{_PATCH_KEY}' in the file; {hint}")
    embed_dim, patch = dims
    size = size_for_embed_dim(embed_dim)
    if size is None:
        raise UserError(f"{path}: could not infer the size: embed dim {embed_dim} is not 192/384/768/1024; {hint}")
    if family == "dinov3" and "blocks.0.mlp.w1.weight" in weights:
        size = "small_plus"
    extra = EXTRA_TOKENS if "register_tokens" in weights else 0
    return make_spec(family, size, patch, extra, depth=_block_count(weights) or None)


def _check_fits(weights: dict[str, Tensor], model: Backbone, path: Path) -> None:
    """UserError naming the first way `weights` do not fit `model`."""
    dims = _file_dims(weights)
    expected = (model.embed_dim, model.patch_size)
    if dims is not None and dims != expected:
        raise UserError(
            f"{path}: tensors do not fit {model.name}: the file has embed dim {dims[0]} and patch {dims[1]}, "
            f"{model.name} has embed dim {expected[0]} and patch {expected[1]}"
        )
    blocks = _block_count(weights)
    if blocks and blocks != len(model.blocks):
        raise UserError(f"{path}: tensors do not fit {model.name}: the file has {blocks} blocks, expected {len(model.blocks)}")
    own = model.state_dict()
    missing = sorted(own.keys() - weights.keys())
    if missing:
        raise UserError(f"{path}: missing backbone weights for {model.name}: {', '.join(missing[:_LISTED])}")
    unexpected = sorted(weights.keys() - own.keys())
    if unexpected:
        raise UserError(f"{path}: unexpected weights for {model.name}: {', '.join(unexpected[:_LISTED])}")
    for key, value in weights.items():
        if value.shape != own[key].shape:
            raise UserError(
                f"{path}: tensors do not fit {model.name}: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )


def _spec_and_weights(path: Path, name: str | None) -> tuple[BackboneSpec, dict[str, Tensor]]:
    if path.is_dir():
        spec, weights = read_hf_folder(path)
        if name is not None and parse_backbone_name(name).name != spec.name:
            raise UserError(f"{path}: the folder's config.json describes {spec.name}, not {name}")
        return spec, weights
    obj = read_checkpoint(path)
    name = name if name is not None else name_from_stem(path.stem)
    spec = parse_backbone_name(name) if name is not None else _infer_spec(obj, path)
    return spec, extract_backbone(obj, spec.family, str(path))


def load_backbone(
    ckpt_path: str | os.PathLike,
    name: str | None = None,
    published_12_heads: bool = False,
    depth: int | None = None,
) -> Backbone:
    """Frozen, `eval()` backbone from an official checkpoint file or a Hugging Face model folder.

    `name` defaults to the file stem (`checkpoint/dino_vit_small_8.pth` -> `dino_vit_small_8`;
    official DINOv2/DINOv3 release names map to ours); a stem that is no backbone name is inferred
    from the file (family from its layout, size and patch from the patch embedding, depth from its
    blocks). A folder is read as a Hugging Face model (`models/hf.py`): family, size and depth from
    its config.json; a Hugging Face id (`facebook/dinov2-small[@revision]`) is read from its snapshot
    folder in the Hugging Face cache (`utils/hf_hub.py`: cache first, downloaded when online).
    `published_12_heads`: see `build_backbone`. `depth` is the expected block count: the name's standard
    one by default, whatever the file holds for random backbones.
    """
    path = resolve_hub_id(str(ckpt_path)).folder if is_hub_id(ckpt_path) else Path(ckpt_path)
    spec, weights = _spec_and_weights(path, name)
    if depth is None:
        depth = (_block_count(weights) or None) if spec.random else spec.depth
    with torch.inference_mode(False):  # plain parameters, usable with and without inference mode
        model = build_spec_backbone(spec, published_12_heads, depth)
        _check_fits(weights, model, path)
        model.load_state_dict(weights, strict=True)
    model.requires_grad_(False)
    return model.eval()


def save_random_checkpoint(name: str, path: str | os.PathLike, depth: int | None = None, seed: int = 0) -> None:
    """Write a randomly initialised backbone `name` to `path` in its family's official file layout
    (atomically). Same `seed`, same weights; the global RNG is left as it was."""
    spec = parse_backbone_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_spec_backbone(spec, depth=depth)
        obj = wrap_backbone(model.state_dict(), spec.family)
    save_torch(obj, Path(path))
