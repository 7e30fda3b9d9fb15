"""Evaluate CAUSE-MLP: unsupervised mIoU / pixel accuracy without and with CRF, and the linear probe."""
from stages.cli import cli  # torch-free: the stage body is imported after the flags are parsed

if __name__ == "__main__":
    cli("test_mlp", "MLP", "stages.evaluate:evaluate")
