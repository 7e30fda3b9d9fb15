"""Stage 1: learn the concept codebook (mediator)."""
from stages.common import cli
from stages.mediator import train_mediator

if __name__ == "__main__":
    cli("mediator", None, train_mediator)
