"""Rows of the result table -> trained and tested here or on SLURM -> status -> published vs measured.

    python reproduce.py list   [--dataset D,..] [--structure MLP,TR] [--ckpt FILE,..]
    python reproduce.py run    [selectors] [--launcher local|slurm] [--slurm_* ...] [-- stage flags]
    python reproduce.py status [selectors]
    python reproduce.py table  [selectors] [--out results/table.md]

The launcher lives in launch/ (docs/reproduce.md, "Reproduce the whole table").
"""
import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
