"""Stage 2, CAUSE-MLP: front-door adjustment by concept-aware contrastive learning."""
from stages.common import cli
from stages.front_door import train_front_door

if __name__ == "__main__":
    cli("front_door_mlp", "MLP", train_front_door)
