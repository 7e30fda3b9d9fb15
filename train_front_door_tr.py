"""Stage 2, CAUSE-TR: front-door adjustment by concept-aware contrastive learning."""
from stages.cli import cli  # torch-free: the stage body is imported after the flags are parsed

if __name__ == "__main__":
    cli("front_door_tr", "TR", "stages.front_door:train_front_door")
