"""Stage 1: learn the concept codebook (mediator)."""
from stages.cli import cli  # torch-free: the stage body is imported after the flags are parsed

if __name__ == "__main__":
    cli("mediator", None, "stages.mediator:train_mediator")
