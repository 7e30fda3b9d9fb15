"""reproduce.py's launcher: rows of the result table -> stage jobs (here or on SLURM) -> status -> table.

rows.py    which rows (a row: dataset, backbone, structure, K, p, batch, seed; sweeps), their stages and
           folders, the flags of each stage, bad-input checks
jobs.py    the one batch script per stage (run by bash here, by sbatch on a cluster)
local.py   `--launcher local`: the stages one after another on this machine
slurm.py   `--launcher slurm`: one job per stage, chained with afterok, resubmission without duplicates
status.py  where each stage stands, from the files on disk (and squeue); what `run` does with a done one
records.py what the stages recorded (stale or not, commit, feature cache)
where.py   which folders status and table read, and where else the rows are
table.py   published vs measured, a line per seed and an aggregate per setting: Markdown, CSV
figure.py  the table as a figure: PNG and PDF
cli.py     the flags and the four subcommands
"""
