"""What `download.py` does with each file: backbones verified by a strict load, datasets checked and
unpacked whole, published CAUSE heads placed where the test scripts look. Sources: downloads/sources.py."""
from __future__ import annotations

import argparse
import datetime
import os
import re
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from downloads.archives import unpack, verify_archive
from downloads.checksums import matches_published, verify_published
from downloads.drive import FOLDER_PAGE, DriveFile, download_file, list_folder
from downloads.sources import BACKBONES, DATASET_SOURCES, DINOV3_ACCESS, PUBLISHED, BackboneSource, DatasetSource, \
    PublishedRow, published_row
from downloads.transfer import download_part
from loader.cropping import write_cropped_set
from loader.datasets_table import DATASETS
from models import load_backbone
from models.hub_cache import cached_release, link_cached_release
from utils.config import ArtifactPaths, checkpoint_stem
from utils.errors import UserError, did_you_mean
from utils.io import file_sha256, provenance_path, read_json, save_json, write_download_record

K_PUBLISHED = 2048


def _choice(name: str, table: dict, what: str):
    if name not in table:
        raise UserError(f"unknown {what} {name!r}{did_you_mean(name, table)}: expected one of {', '.join(table)} "
                        f"(`python download.py list`)")
    return table[name]


# ---------------------------------------------------------------- backbones

def fetch_backbone(name: str, dest_dir: Path, url: str | None = None) -> Path:
    """`dest_dir/<name>.pth`: the released file byte for byte, loaded strictly before it is renamed into
    place, its sha256 in `<name>.json` beside it. A present, verified file is kept."""
    source = _choice(name, BACKBONES, "backbone")
    final = Path(dest_dir) / f"{name}.pth"
    if final.exists():
        _check_present_backbone(name, final)
        return final
    cached = cached_release(source.release)
    if cached is not None and _cache_matches_published(cached, source) and link_cached_release(name, cached, final):
        published = verify_published(final, source.checksum, str(final))
        _record_backbone(final, name, None, source.release, file_sha256(final), published)
        return final
    address = url or source.url
    if address is None:
        raise UserError(f"{name}: {DINOV3_ACCESS}")
    part = download_part(address, final)
    published = verify_published(part, source.checksum, address)
    try:
        load_backbone(part, name=name)
    except UserError as e:
        part.unlink()
        raise UserError(f"{address}: the downloaded file does not load as {name} ({e}); it was removed. "
                        f"Run again; if it fails the same way, the release changed: fetch it by hand") from None
    digest = file_sha256(part)
    os.replace(part, final)
    _record_backbone(final, name, address, source.release, digest, published)
    print(f"{final}: downloaded, loads strictly as {name}, sha256 {digest}")
    print(f"next: ckpt={final} bash run")
    return final


def _cache_matches_published(cached: Path, source: BackboneSource) -> bool:
    """Whether the torch hub cache's `cached` has the release's published checksum (True where none is
    published); a mismatch is named, and the cache left as it is: a fresh copy is downloaded instead."""
    if source.checksum is None:
        return True
    matches, actual = matches_published(cached, source.checksum)
    if not matches:
        print(f"{cached}: in the torch hub cache, but its {source.checksum.algorithm} {actual} is not the published "
              f"{source.checksum.expected} ({source.checksum.published_by}); left as it is, downloading a fresh "
              f"copy instead")
    return matches


def _record_backbone(final: Path, name: str, address: str | None, release: str, digest: str,
                     published: dict[str, str] | None) -> None:
    """The download record: what `final` is, where it came from, its sha256 and the published checksum it
    matched (null: the release publishes none)."""
    save_json({"backbone": name, "release": release, "url": address, "sha256": digest,
               "bytes": final.stat().st_size, "published_checksum": published,
               "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              provenance_path(final))


def _check_present_backbone(name: str, final: Path) -> None:
    """Skip a file whose recorded sha256 matches; record one that matches the published checksum and loads
    strictly; refuse anything else (without removing it)."""
    record = read_json(provenance_path(final), "download record")
    digest = file_sha256(final)
    if record is not None and "sha256" in record:
        if record["sha256"] != digest:
            raise UserError(f"{final} differs from the file downloaded from {record.get('url')} (sha256 mismatch): "
                            f"move it and {provenance_path(final)} away to download it again")
        print(f"{final}: already present and verified (sha256 {digest}); skipping")
        return
    published = verify_published(final, BACKBONES[name].checksum, str(final), remove=False)
    try:
        load_backbone(final, name=name)
    except UserError as e:
        raise UserError(f"{final} exists but does not load as {name} ({e}); move it away to download it again") \
            from None
    _record_backbone(final, name, None, BACKBONES[name].release, digest, published)
    print(f"{final}: already present (not downloaded by this tool), loads strictly as {name}; "
          f"recorded its sha256 in {provenance_path(final)}; skipping")


# ---------------------------------------------------------------- datasets

def fetch_dataset(name: str, data_dir: Path, crop: bool = True, keep_archive: bool = False,
                  num_workers: int = 0) -> Path:
    """Download, CRC-check and unpack a dataset archive into the layout of loader/layouts.py; then
    (crop=True) write the published pre-cropped training sets of every dataset it serves."""
    source = _choice(name, DATASET_SOURCES, "dataset")
    data_dir = Path(data_dir)
    dest = data_dir / source.dest
    if dest.exists():
        print(f"{dest}: already present; skipping the download (remove it to download again)")
    else:
        archive = data_dir / PurePosixPath(source.url).name
        if archive.exists():
            print(f"{archive}: found from an earlier run; checking it")
            published = _verify_or_remove(archive, source)
        else:
            part = download_part(source.url, archive)
            published = _verify_or_remove(part, source)
            os.replace(part, archive)
        left_out = unpack(archive, source.top, dest)
        if left_out:
            print(f"{archive}: left out {len(left_out)} entries outside {source.top}/ (e.g. {left_out[0]})")
        save_json({"dataset": name, "url": source.url, "archive": archive.name, "bytes": archive.stat().st_size,
                   "checked": "every member read to the end (zip CRC-32 / tar lengths)",
                   "published_checksum": published,
                   "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                  provenance_path(dest))
        if not keep_archive:
            archive.unlink()
        print(f"{dest}: unpacked (download record: {provenance_path(dest)})")
    if crop:
        for dataset in source.serves:
            kind = DATASETS[dataset].crop_type
            if kind is not None:
                out, written = write_cropped_set(dataset, data_dir, kind, num_workers=num_workers)
                print(f"{out}: pre-cropped {dataset} training set complete ({written} crops written now)")
    print(f"next: python train_mediator.py --dataset {source.serves[0]} --data_dir {data_dir} "
          f"--ckpt checkpoint/dino_vit_base_8.pth")
    return dest


def _verify_or_remove(archive: Path, source: DatasetSource) -> dict[str, str] | None:
    """The published checksum's record (None where none is published) after the member checks; a failure
    removes the archive."""
    published = verify_published(archive, source.checksum, source.url)
    try:
        verify_archive(archive)
    except UserError as e:
        archive.unlink()
        raise UserError(f"{source.url}: {e}; nothing was unpacked and the file was removed: run again to download "
                        f"it anew") from None
    return published


# ---------------------------------------------------------------- published heads

def fetch_published(dataset: str, ckpt: str, structure: str, output_dir: Path = Path("CAUSE"),
                    data_dir: Path = Path("data"), ckpt_dir: Path = Path("checkpoint")) -> str:
    """The segment head, cluster probe and codebook of one published row, where the test scripts look;
    returns the command that evaluates them."""
    backbone = checkpoint_stem(ckpt)
    row = published_row(dataset, backbone, structure)
    if row is None:
        raise UserError(f"no published CAUSE-{structure} row for --dataset {dataset} with {backbone}; "
                        f"`python download.py list` shows the {len(PUBLISHED)} published rows")
    paths = ArtifactPaths.of(argparse.Namespace(output_dir=str(output_dir), dataset=dataset,
                                                num_codebook=K_PUBLISHED, results_dir="results"),
                             backbone, structure)
    tag = structure.lower()
    wanted = {paths.segment: f"segment_{tag}.pth", paths.cluster: f"cluster_{tag}.pth", paths.codebook: "modular.npy"}
    missing = []
    for dest in wanted:
        if dest.exists():
            _check_published_file(dest, dest)
            print(f"{dest}: already present and readable; skipping")
        else:
            missing.append(dest)
    if missing:
        folders = [(row.head_folder, list_folder(row.head_folder)),
                   (row.clusterbook_folder, list_folder(row.clusterbook_folder))]
        for dest in missing:
            folder, entry = _pick(folders, wanted[dest], row, dest)
            part = download_file(entry.file_id, dest, folder)
            try:
                _check_published_file(part, dest)
            except UserError:
                part.unlink()
                raise
            os.replace(part, dest)
            write_download_record(dest, {"published": f"{row.dataset} {row.backbone} CAUSE-{structure}",
                                         "file": entry.path, "folder": FOLDER_PAGE.format(folder)})
            print(f"{dest}: downloaded ({entry.path} of {FOLDER_PAGE.format(folder)})")
    return _next_command(row, output_dir, data_dir, ckpt_dir)


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _pick(folders: list[tuple[str, list[DriveFile]]], name: str, row: PublishedRow,
          dest: Path) -> tuple[str, DriveFile]:
    """The one file called `name` in the row's folders (when several, the one whose path names the dataset)."""
    found = [(folder, f) for folder, files in folders for f in files if PurePosixPath(f.path).name == name]
    if len(found) > 1:
        found = [(folder, f) for folder, f in found if _normalised(row.dataset) in _normalised(f.path)] or found
    where = " and ".join(FOLDER_PAGE.format(folder) for folder, _ in folders)
    if not found:
        listed = ", ".join(f.path for _, files in folders for f in files) or "nothing"
        raise UserError(f"the published folders {where} hold no {name} (found: {listed}); "
                        f"download it by hand to {dest}")
    if len(found) > 1:
        raise UserError(f"the published folders {where} hold {len(found)} files named {name} "
                        f"({', '.join(f.path for _, f in found)}); download the one for {row.dataset} by hand "
                        f"to {dest}")
    return found[0]


def _check_published_file(path: Path, dest: Path) -> None:
    """The file reads back as what `dest`'s name says: a segment state dict, a cluster file or a codebook."""
    try:
        if dest.suffix == ".npy":
            codebook = np.load(path)
            ok = codebook.ndim == 2
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            key = "head." if dest.name.startswith("segment") else "cluster_probe"
            ok = isinstance(state, dict) and any(k.startswith(key) for k in state)
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise UserError(f"{path} is not a readable {dest.name} ({type(e).__name__}: {e}); remove it and run "
                        f"again") from None
    if not ok:
        raise UserError(f"{path} does not hold what {dest.name} should (a 2-D codebook / head.* / cluster_probe); "
                        f"remove it and run again")


def _next_command(row: PublishedRow, output_dir: Path, data_dir: Path, ckpt_dir: Path) -> str:
    ckpt = Path(ckpt_dir) / f"{row.backbone}.pth"
    flags = f"--dataset {row.dataset} --data_dir {data_dir} --ckpt {ckpt}"
    if str(output_dir) != "CAUSE":
        flags += f" --output_dir {output_dir}"
    if row.backbone.startswith("dino_vit_small"):
        flags += " --published_12_heads true"
    steps = []
    if not ckpt.exists():
        steps.append(f"python download.py backbone {row.backbone} --dest {ckpt_dir}")
    source = next(n for n, s in DATASET_SOURCES.items() if row.dataset in s.serves)
    if not (Path(data_dir) / DATASET_SOURCES[source].dest).exists():
        steps.append(f"python download.py dataset {source} --data_dir {data_dir}")
    steps.append(f"python test_{row.structure.lower()}.py {flags}")
    return "\n".join(steps)
