"""CAUSE from Python: a trained segmenter as one `nn.Module`, and the backbones.

    import cause
    seg = cause.load_segmenter("checkpoint/dino_vit_base_8.pth", "cocostuff27", structure="TR")
    ids = seg.predict(["a.jpg", "b.jpg"])           # cluster ids at each image's size
    classes = seg.predict(images, matched=True)     # class ids (Hungarian assignment of test_tr.py)

`torch.hub.load(repo_dir, "cause_tr", source="local", dataset=..., ckpt=...)` gives the same model
(hubconf.py); `load_backbone` also takes Hugging Face ids such as "facebook/dinov2-small".
"""
from models import build_backbone, load_backbone
from stages.segmenter import Segmenter, load_segmenter

__all__ = ["Segmenter", "build_backbone", "load_backbone", "load_segmenter"]
