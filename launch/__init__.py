"""reproduce.py's launcher: rows of the result table -> stage jobs (here or on SLURM) -> status -> table.

rows.py    which rows, their stages, the flags of each stage, bad-input checks
jobs.py    the one batch script per stage (run by bash here, by sbatch on a cluster)
local.py   `--launcher local`: the stages one after another on this machine
slurm.py   `--launcher slurm`: one job per stage, chained with afterok, resubmission without duplicates
status.py  where each stage stands, from the files on disk (and squeue)
table.py   published vs measured: Markdown, CSV, PNG
cli.py     the flags and the four subcommands
"""
