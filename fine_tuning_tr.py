"""Stage 3, CAUSE-TR: cluster-probe fine-tuning."""
from stages.common import cli
from stages.fine_tuning import fine_tune

if __name__ == "__main__":
    cli("fine_tuning_tr", "TR", fine_tune)
