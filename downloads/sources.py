"""Where every downloadable thing comes from: backbone releases, dataset archives, published CAUSE heads.

Names and addresses only (sizes are approximate, for `python download.py list`); the transfers are
in downloads/transfer.py and downloads/drive.py, what is done with each file in downloads/fetch.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from downloads.checksums import Checksum

FBAI = "https://dl.fbaipublicfiles.com"
IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"
STEGO = "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data"
VOC = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
DINOV3_ACCESS = ("DINOv3 weights are gated: request access at https://ai.meta.com/resources/models-and-libraries/"
                 "dinov3-downloads/ , then pass the signed link you receive by e-mail with --url")


@dataclass(frozen=True)
class BackboneSource:
    release: str            # the official file's name
    url: str | None         # None: gated, the user passes --url
    approx_mb: int
    published: bool = True  # used by the published CAUSE results
    checksum: Checksum | None = None   # where the release publishes one


def _dino(release: str, mb: int) -> BackboneSource:
    return BackboneSource(f"{release}.pth", f"{FBAI}/dino/{release}/{release}.pth", mb)


def _dinov2(arch: str, mb: int, registers: bool = False) -> BackboneSource:
    release = f"dinov2_{arch}{'_reg4' if registers else ''}_pretrain.pth"
    return BackboneSource(release, f"{FBAI}/dinov2/dinov2_{arch}/{release}", mb, published=not registers)


def _dinov3(release: str, mb: int) -> BackboneSource:
    """The file name ends in the first 8 hex digits of the file's sha256 (checked by torch.hub too)."""
    prefix = re.fullmatch(r".*-([0-9a-f]{8})\.pth", release).group(1)
    return BackboneSource(release, None, mb, published=False,
                          checksum=Checksum("sha256", prefix, "the DINOv3 file name"))


BACKBONES: dict[str, BackboneSource] = {
    "dino_vit_small_8": _dino("dino_deitsmall8_pretrain", 85),
    "dino_vit_small_16": _dino("dino_deitsmall16_pretrain", 85),
    "dino_vit_base_8": _dino("dino_vitbase8_pretrain", 330),
    "dino_vit_base_16": _dino("dino_vitbase16_pretrain", 330),
    "dinov2_vit_small_14": _dinov2("vits14", 85),
    "dinov2_vit_base_14": _dinov2("vitb14", 330),
    "dinov2_vit_large_14": _dinov2("vitl14", 1200),
    "ibot_vit_base_16": BackboneSource("checkpoint_teacher.pth", f"{IBOT}/vitb_16/checkpoint_teacher.pth", 400),
    "msn_vit_small_16": BackboneSource("vits16_800ep.pth.tar", f"{FBAI}/msn/vits16_800ep.pth.tar", 300),
    "mae_vit_base_16": BackboneSource("mae_pretrain_vit_base.pth", f"{FBAI}/mae/pretrain/mae_pretrain_vit_base.pth",
                                      330, checksum=Checksum("md5", "8cad7c", "the MAE README")),
    # not in the published CAUSE (loaded once the models support them)
    "dinov2_vit_small_14_reg4": _dinov2("vits14", 85, registers=True),
    "dinov2_vit_base_14_reg4": _dinov2("vitb14", 330, registers=True),
    "dinov2_vit_large_14_reg4": _dinov2("vitl14", 1200, registers=True),
    "dinov3_vit_small_16": _dinov3("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", 85),
    "dinov3_vit_small_plus_16": _dinov3("dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", 115),
    "dinov3_vit_base_16": _dinov3("dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", 330),
    "dinov3_vit_large_16": _dinov3("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", 1200),
}


@dataclass(frozen=True)
class DatasetSource:
    url: str
    top: str                  # the one folder at the top of the archive
    dest: str                 # where that folder goes, relative to --data_dir
    serves: tuple[str, ...]   # the --dataset names read from it
    approx_gb: float
    checksum: Checksum | None = None   # where the release publishes one


DATASET_SOURCES: dict[str, DatasetSource] = {
    "cocostuff": DatasetSource(f"{STEGO}/cocostuff.zip", "cocostuff", "cocostuff",
                               ("cocostuff27", "coco81", "coco171"), 21.0),
    "cityscapes": DatasetSource(f"{STEGO}/cityscapes.zip", "cityscapes", "cityscapes", ("cityscapes",), 11.0),
    "potsdam": DatasetSource(f"{STEGO}/potsdam.zip", "potsdam", "potsdam", ("potsdam",), 1.5),
    "potsdamraw": DatasetSource(f"{STEGO}/potsdamraw.zip", "potsdamraw", "potsdamraw", ("potsdamraw",), 1.5),
    "pascalvoc": DatasetSource(VOC, "VOCdevkit", "pascalvoc/VOCdevkit", ("pascalvoc",), 1.9,
                               Checksum("md5", "6cd6e144f989b92b3379bac3b3de84fd", "torchvision's VOCSegmentation")),
}


@dataclass(frozen=True)
class PublishedRow:
    """One row of the published CAUSE result tables and the Drive folders of its files."""
    dataset: str
    backbone: str
    structure: str              # "MLP" or "TR"
    miou: float                 # with CRF, as published
    pacc: float | None
    head_folder: str            # "Seg Head Parameter": segment_*.pth, cluster_*.pth
    clusterbook_folder: str     # "Concept ClusterBook": modular.npy

    @property
    def approx_mb(self) -> int:
        """Segment head + cluster probe + codebook at K=2048 (measured on the architectures)."""
        base = "base" in self.backbone
        return (93 if base else 37) if self.structure == "TR" else (20 if base else 10)


PUBLISHED: tuple[PublishedRow, ...] = (
    PublishedRow("cocostuff27", "dino_vit_small_8", "MLP", 27.9, 66.8, "1ByLMYly-lLAa4vBQZ8Sv8nLSWBLPbev-", "14bq-B4Xj4V3Usl2b2SfobCOaap4lzIXl"),
    PublishedRow("cocostuff27", "dino_vit_small_8", "TR", 32.4, 69.6, "1ByLMYly-lLAa4vBQZ8Sv8nLSWBLPbev-", "14bq-B4Xj4V3Usl2b2SfobCOaap4lzIXl"),
    PublishedRow("cocostuff27", "dino_vit_small_16", "MLP", 25.9, 66.3, "1PfOHDxWF_YcPVOApUSK-xHDUSY32domZ", "1GnVOgtOZdt8N7M6cudd5d59FqZAQDDG5"),
    PublishedRow("cocostuff27", "dino_vit_small_16", "TR", 33.1, 70.4, "1PfOHDxWF_YcPVOApUSK-xHDUSY32domZ", "1GnVOgtOZdt8N7M6cudd5d59FqZAQDDG5"),
    PublishedRow("cocostuff27", "dino_vit_base_8", "MLP", 34.3, 72.8, "1Og2U2ihbPBrxpAAeWuped_FH4u_ecb0P", "10bZecU1EzgOISoi0RkajqSR-ebfAWr_N"),
    PublishedRow("cocostuff27", "dino_vit_base_8", "TR", 41.9, 74.9, "1Og2U2ihbPBrxpAAeWuped_FH4u_ecb0P", "10bZecU1EzgOISoi0RkajqSR-ebfAWr_N"),
    PublishedRow("cocostuff27", "dinov2_vit_base_14", "TR", 45.3, 78.0, "1CWMussJAvGulg94lUrNn3EooILbtgIOb", "1nBjBJnucRiBYFiJHeOJUuE5e1YSoYKaf"),
    PublishedRow("cocostuff27", "ibot_vit_base_16", "TR", 39.5, 73.8, "1BAMopzQNU7cmiaCyFv73SBLj2F6gikuU", "1mbJdzpOrR-sjmAk0O1hnqzsStXDU3CL9"),
    PublishedRow("cocostuff27", "msn_vit_small_16", "TR", 34.1, 72.1, "15F2aaVMbG40ISSXTL0f_UrVkX3UAFwZw", "19Mv7_5sM6e48eH80bAZSagXhO9CfEbCS"),
    PublishedRow("cocostuff27", "mae_vit_base_16", "TR", 21.5, 59.1, "1ubUbmSliqrN19v6Abqsb_djtWDbx9qbV", "1G91qCJx-Z3IpYFYLFAUyG1zqMMZOhQWx"),
    PublishedRow("cityscapes", "dino_vit_small_8", "MLP", 21.7, 87.7, "1MT_HPyZvn09jEsvnlGci9ZLDB2e6h4PI", "1-ZfobyjlUGx5nltnBnjSzKzLQLTqcD_r"),
    PublishedRow("cityscapes", "dino_vit_small_8", "TR", 24.6, 89.4, "1MT_HPyZvn09jEsvnlGci9ZLDB2e6h4PI", "1-ZfobyjlUGx5nltnBnjSzKzLQLTqcD_r"),
    PublishedRow("cityscapes", "dino_vit_base_8", "MLP", 25.7, 90.3, "1Y7K3v_IUUn82rq5df6cQUagL_sNLZRdT", "1EoidRFHOT1w8LFNt2ws7C1BCkYdI4fw1"),
    PublishedRow("cityscapes", "dino_vit_base_8", "TR", 28.0, 90.8, "1Y7K3v_IUUn82rq5df6cQUagL_sNLZRdT", "1EoidRFHOT1w8LFNt2ws7C1BCkYdI4fw1"),
    PublishedRow("cityscapes", "dinov2_vit_base_14", "TR", 29.9, 89.8, "1fi_DvMD3CLaZEozEgrGhIh6nH7WFq_Sj", "1t66yv8_otlAMwy-QQyff-6fiwP58kCvV"),
    PublishedRow("cityscapes", "ibot_vit_base_16", "TR", 23.0, 89.1, "1T9OqBTc9tw9h3zDzzi137l8ls29_uOrd", "1t4qsGMYlIWoArvkAFr-uUerkwQYPR5u7"),
    PublishedRow("cityscapes", "msn_vit_small_16", "TR", 21.2, 89.1, "1UQnhVADQvbnQKLjIXzEpY_hW76Yeeuuj", "1TLGaZjljYoVCFp4EjjOghtvczk-SzVR1"),
    PublishedRow("cityscapes", "mae_vit_base_16", "TR", 12.5, 82.0, "1Ng9mVhzAipmY5aPzJkX35flqJIQ8rgIp", "1SFYWWo5Khqoy8fIhvxuL2XoZEaKt1UH-"),
    PublishedRow("pascalvoc", "dino_vit_small_8", "MLP", 46.0, None, "1o6AkLzqC1J-V4YB_S7BBhfGd2E6qdopO", "1H9dvIDaEW1fsIKsI1HPETD4NC2dj6Z6S"),
    PublishedRow("pascalvoc", "dino_vit_small_8", "TR", 50.0, None, "1o6AkLzqC1J-V4YB_S7BBhfGd2E6qdopO", "1H9dvIDaEW1fsIKsI1HPETD4NC2dj6Z6S"),
    PublishedRow("pascalvoc", "dino_vit_base_8", "MLP", 47.9, None, "1sPlG9jQ-DljVguPNPDS1g3xnW_rTtUyw", "1zsTx1NOECcJ7DH1wa654wRH_NLV6FHWP"),
    PublishedRow("pascalvoc", "dino_vit_base_8", "TR", 53.3, None, "1sPlG9jQ-DljVguPNPDS1g3xnW_rTtUyw", "1zsTx1NOECcJ7DH1wa654wRH_NLV6FHWP"),
    PublishedRow("pascalvoc", "dinov2_vit_base_14", "TR", 53.2, 91.5, "1qsuKMVvpqsaYcVvZj3rDecmhZBAHOTeK", "1aGs3KSExQrdQytVFWigOGRs2yC3YLO12"),
    PublishedRow("pascalvoc", "ibot_vit_base_16", "TR", 53.4, 89.6, "1G9zvKcLNbhAyqKlJXUpt80CR6MBtuSdi", "1zA9d5eo41GerRWuBOnHY6_AjhtjGETCy"),
    PublishedRow("pascalvoc", "msn_vit_small_16", "TR", 30.2, 84.2, "1s6nzSmzt_ZTt_tCDvf8vmhU2RmE3Cdy0", "1bwLogZo3vJOJrpSanRpgZ_1WHTeB3e4q"),
    PublishedRow("pascalvoc", "mae_vit_base_16", "TR", 25.8, 83.7, "1Re_f8QgIdXDnrNwP_5g-kFL-6SoE9YPU", "1wOVWzTnfH58My8PT8rXW0sw2oVdc4xkL"),
    PublishedRow("coco81", "dino_vit_small_8", "MLP", 19.1, 78.8, "1SlQ1_3phGBvjaxizjcYD92Nglab7RV6k", "1ON5vDLS_Wc5OGgTxVK_yFopQGHbKaOar"),
    PublishedRow("coco81", "dino_vit_small_8", "TR", 21.2, 75.2, "1SlQ1_3phGBvjaxizjcYD92Nglab7RV6k", "1ON5vDLS_Wc5OGgTxVK_yFopQGHbKaOar"),
    PublishedRow("coco171", "dino_vit_small_8", "MLP", 10.6, 44.9, "1SlQ1_3phGBvjaxizjcYD92Nglab7RV6k", "1ON5vDLS_Wc5OGgTxVK_yFopQGHbKaOar"),
    PublishedRow("coco171", "dino_vit_small_8", "TR", 15.2, 46.6, "1SlQ1_3phGBvjaxizjcYD92Nglab7RV6k", "1ON5vDLS_Wc5OGgTxVK_yFopQGHbKaOar"),
)


def published_row(dataset: str, backbone: str, structure: str) -> PublishedRow | None:
    return next((r for r in PUBLISHED if (r.dataset, r.backbone, r.structure) == (dataset, backbone, structure)),
                None)


def listing() -> str:
    """Every name each subcommand accepts, with approximate sizes (no network)."""
    lines = ["backbones: python download.py backbone NAME [--dest checkpoint] [--url URL]"]
    for name, b in BACKBONES.items():
        note = "gated: --url" if b.url is None else b.release
        note += "" if b.published else "  (not in the published CAUSE)"
        lines.append(f"  {name:<26} {_size(b.approx_mb / 1000):>9}  {note}")
    lines.append("datasets: python download.py dataset NAME [--data_dir data] [--crop true|false]")
    for name, d in DATASET_SOURCES.items():
        lines.append(f"  {name:<26} {_size(d.approx_gb):>9}  --dataset {', '.join(d.serves)}")
    lines.append("published CAUSE heads: python download.py published --dataset D --ckpt NAME --structure MLP|TR")
    for r in PUBLISHED:
        pacc = "-" if r.pacc is None else f"{r.pacc:.1f}"
        lines.append(f"  --dataset {r.dataset:<11} --ckpt {r.backbone:<18} --structure {r.structure:<3}  "
                     f"{_size(r.approx_mb / 1000):>9}  published mIoU {r.miou:.1f}, pAcc {pacc}")
    lines.append("sizes are approximate")
    return "\n".join(lines)


def _size(gb: float) -> str:
    return f"~{gb:.1f} GB" if gb >= 1 else f"~{gb * 1000:.0f} MB"
