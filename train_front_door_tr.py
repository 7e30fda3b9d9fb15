"""Stage 2, CAUSE-TR: front-door adjustment by concept-aware contrastive learning."""
from stages.common import cli
from stages.front_door import train_front_door

if __name__ == "__main__":
    cli("front_door_tr", "TR", train_front_door)
