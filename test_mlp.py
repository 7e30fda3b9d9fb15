"""Evaluate CAUSE-MLP: unsupervised mIoU / pixel accuracy without and with CRF, and the linear probe."""
from stages.common import cli
from stages.evaluate import evaluate

if __name__ == "__main__":
    cli("test_mlp", "MLP", evaluate)
