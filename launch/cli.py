"""reproduce.py: list | run | status | table over the rows chosen by --dataset, --structure, --ckpt."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.jobs import Resources
from launch.rows import (RECIPE_DIRS, Row, Settings, Stage, check_inputs, check_passthrough, row_stages, select_rows,
                         sweep, validate_stage_flags, write_missing_toy_backbones)
from utils.config import OneLineParser, bounded_int, str2bool
from utils.errors import UserError


def _comma(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _int_list(lo: int, hi: int | None = None):
    """argparse `type=` of a comma list of integers in [lo, hi] (a sweep: `--seed 0,1,2`)."""
    one = bounded_int(lo, hi)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(t) for t in text.split(",") if t.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
        return values
    parse.__name__ = "comma list"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Train, test and tabulate rows of the result table, here or on SLURM. "
                                  "Stage flags after -- go to every stage that accepts them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,run,status,table}")
    parsers = {
        "list": sub.add_parser("list", help="the rows the selectors choose"),
        "run": sub.add_parser("run", help="train and test the rows (what is done is skipped, partial resumed)"),
        "status": sub.add_parser("status", help="where each row and stage stands"),
        "table": sub.add_parser("table", help="published vs measured, as Markdown (--out: also CSV and PNG)"),
    }
    for q in parsers.values():
        rows = q.add_argument_group("rows (each a comma list; none: every published row)")
        rows.add_argument("--dataset", type=_comma, default=None,
                          help="e.g. cocostuff27,cityscapes; toy: the toy rows; directory: your --data_dir")
        rows.add_argument("--structure", type=_comma, default=None, help="MLP,TR (default both)")
        rows.add_argument("--ckpt", type=_comma, default=None,
                          help="backbone files, e.g. checkpoint/dino_vit_base_8.pth (default: the published rows')")
        where = q.add_argument_group("where")
        where.add_argument("--recipe", choices=["published", "default"], default="published",
                           help="published: the recipe of the published table (--published_recipe true, under "
                                "CAUSE_published/ results_published/ logs_published/); default: this repository's")
        where.add_argument("--data_dir", default="data", help="dataset root (directory: your folder)")
        where.add_argument("--ckpt_dir", default="checkpoint", help="folder of the backbone files of published rows")
        where.add_argument("--output_dir", default=None, help="artifacts (default: per recipe, see --recipe)")
        where.add_argument("--results_dir", default=None, help="test results (default: per recipe)")
        where.add_argument("--log_dir", default=None,
                           help="job scripts and logs under <log_dir>/reproduce/, TensorBoard (default: per recipe)")
        sizes = q.add_argument_group("sizes (default: per dataset, loader/datasets_table.py, as bash run)")
        sizes.add_argument("--num_codebook", type=_int_list(1), default=None, help="K, or a comma list of K (a sweep)")
        sizes.add_argument("--projection_dim", type=_int_list(1), default=None, help="p, or a comma list of p")
        sizes.add_argument("--seed", type=_int_list(0, 2**32 - 1), default=(0,),
                           help="seed of every stage, or a comma list (one row per seed; the table adds mean ± std)")
        sizes.add_argument("--batch_size", type=bounded_int(1), default=None, help="images per process and step")
        sizes.add_argument("--n_classes", type=bounded_int(1), default=None, help="classes of a directory dataset")
    run = parsers["run"]
    run.add_argument("--launcher", choices=["local", "slurm"], default="local",
                     help="local: the rows one after another here; slurm: one sbatch job per stage and row")
    run.add_argument("--gpu", default=None, help="local: GPU indices as in the scripts, e.g. 0 or 0,1,2,3")
    run.add_argument("--feature_cache", default=None, metavar="DIR",
                     help="the training stages' --feature_cache: one cache of backbone features shared by the MLP "
                          "and TR rows of a dataset, backbone and resolution, and by their seeds "
                          "(docs/feature-cache.md)")
    run.add_argument("--wait", type=str2bool, default=False,
                     help="slurm: block until every job ends; exit 0 only when every stage asked for is done "
                          "(the others are named with their state)")
    slurm = run.add_argument_group("slurm resources (per job)")
    slurm.add_argument("--slurm_partition", default=None)
    slurm.add_argument("--slurm_account", default=None)
    slurm.add_argument("--slurm_time", default=None, help="time limit, e.g. 12:00:00")
    slurm.add_argument("--slurm_cpus", type=bounded_int(1), default=None, help="CPUs per process, and its threads (OMP_NUM_THREADS)")
    slurm.add_argument("--slurm_gpus", type=bounded_int(0), default=1, help="GPUs per job (0: CPU)")
    slurm.add_argument("--nproc", type=bounded_int(1), default=None,
                       help="processes per job, started by this Python's `-m utils.distributed` (default: the "
                            "GPUs per job, 1 on CPU; with --slurm_gpus 0, CPU processes under Gloo)")
    slurm.add_argument("--slurm_mem", default=None, help="memory per job, e.g. 32G")
    slurm.add_argument("--slurm_extra", default="", help='more sbatch options, e.g. "--qos=low --constraint=a100"')
    parsers["table"].add_argument("--out", default=None,
                                  help="also write this Markdown file, a .csv and a .png (published vs measured)")
    return p


def settings_of(args: argparse.Namespace, passthrough: list[str]) -> Settings:
    output_dir, results_dir, log_dir = RECIPE_DIRS[args.recipe]
    return Settings(recipe=args.recipe, data_dir=args.data_dir, output_dir=args.output_dir or output_dir,
                    results_dir=args.results_dir or results_dir, log_dir=args.log_dir or log_dir,
                    num_codebook=args.num_codebook, projection_dim=args.projection_dim,
                    batch_size=args.batch_size, n_classes=args.n_classes, gpu=getattr(args, "gpu", None),
                    feature_cache=getattr(args, "feature_cache", None), passthrough=tuple(passthrough),
                    seed=args.seed)


def make_plan(args: argparse.Namespace, settings: Settings) -> list[tuple[Row, list[Stage]]]:
    rows = select_rows(args.dataset, args.structure, args.ckpt, args.ckpt_dir)
    scripts = ["train_mediator", "test_kmeans", *(f"{stage}_{row.structure.lower()}" for row in rows
                                                   for stage in ("train_front_door", "fine_tuning", "test"))]
    check_passthrough(settings, list(dict.fromkeys(scripts)))
    return [(row, row_stages(row, settings)) for row in sweep(rows, settings)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        settings = settings_of(args, passthrough)
        plan = make_plan(args, settings)
        return _command(args, settings, plan)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again; done stages are skipped, partial ones resumed",
              file=sys.stderr)
        return 130


def _command(args: argparse.Namespace, settings: Settings, plan: list[tuple[Row, list[Stage]]]) -> int:
    from launch import status, table, where
    if args.command == "list":
        print(table.listing(plan, settings))
        return 0
    if args.command in ("status", "table"):
        for line in where.lines(settings, plan):
            print(line, file=sys.stderr)
    if args.command == "status":
        print(status.format_status(plan, settings.log_dir))
        return 0
    if args.command == "table":
        rows = table.table_rows(plan, settings)
        print(table.markdown(rows))
        if args.out:
            for path in table.write_outputs(rows, Path(args.out)):
                print(f"wrote {path}", file=sys.stderr)
        return 0
    return _run(args, settings, plan)


_SLURM_DEFAULTS = {"slurm_partition": None, "slurm_account": None, "slurm_time": None, "slurm_cpus": None,
                   "slurm_gpus": 1, "slurm_mem": None, "slurm_extra": "", "nproc": None}


def processes_per_job(args: argparse.Namespace) -> int:
    """--nproc, else one process per GPU of the job (1 on CPU); on GPUs at most one process per GPU."""
    if args.nproc is None:
        return max(1, args.slurm_gpus)
    if args.slurm_gpus and args.nproc > args.slurm_gpus:
        raise UserError(f"--nproc {args.nproc}: more processes than the job's GPUs (--slurm_gpus {args.slurm_gpus}); "
                        f"expected at most one process per GPU")
    return args.nproc


def _run(args: argparse.Namespace, settings: Settings, plan: list[tuple[Row, list[Stage]]]) -> int:
    from launch import local, slurm
    if args.launcher == "slurm":
        if args.gpu is not None:
            raise UserError("--gpu is for --launcher local; on SLURM ask for GPUs with --slurm_gpus")
        slurm.check_sbatch()
        resources = Resources(args.slurm_partition, args.slurm_account, args.slurm_time, args.slurm_cpus,
                              args.slurm_gpus, args.slurm_mem, args.slurm_extra, processes_per_job(args))
    else:
        given = [f"--{k}" for k, v in vars(args).items() if k in _SLURM_DEFAULTS and v != _SLURM_DEFAULTS[k]]
        if given:
            raise UserError(f"{given[0]} is for --launcher slurm (this call runs --launcher local)")
    check_inputs([row for row, _ in plan], settings)
    validate_stage_flags([s for _, stages in plan for s in stages])
    write_missing_toy_backbones([row for row, _ in plan])
    if args.launcher == "local":
        return local.run_local(plan, settings)
    submitted = slurm.submit(plan, settings, resources)
    print(f"[reproduce] {len(submitted)} job(s) submitted; `python reproduce.py status` (same selectors) "
          f"shows where they stand")
    return slurm.wait_for(plan, settings) if args.wait else 0
