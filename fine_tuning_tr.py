"""Stage 3, CAUSE-TR: cluster-probe fine-tuning."""
from stages.cli import cli  # torch-free: the stage body is imported after the flags are parsed

if __name__ == "__main__":
    cli("fine_tuning_tr", "TR", "stages.fine_tuning:fine_tune")
