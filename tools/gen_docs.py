"""Write the documentation that is generated from the code, so that it cannot drift from it.

    python -m tools.gen_docs           # rewrite docs/flags.md and the generated blocks of the pages
    python -m tools.gen_docs --check   # exit 1 naming every file that is out of date (tests/test_docs.py)

docs/flags.md comes whole from the scripts' parsers (tools/scripts.py). The tables between
`<!-- BEGIN generated NAME ... -->` and `<!-- END generated NAME -->` in README.md and docs/*.md come
from downloads/sources.py (backbones, published rows) and loader/datasets_table.py (datasets); the text
around them is written by hand.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from tools.scripts import ROOT, Script, scripts, subparsers

COMMAND = "python -m tools.gen_docs"
FLAGS_PAGE = "docs/flags.md"


# ---------------------------------------------------------------------------------------------- flags
def split_default(action: argparse.Action) -> tuple[str, str]:
    """(default, help) of a flag as the docs show them: a `(default: ...)` the help states is moved to the
    default column (it may hold parentheses itself: `min(8, CPUs - 1)`), else the parser's value."""
    text = " ".join((action.help or "").split())
    start = text.find("(default: ")
    if start >= 0:
        depth, end = 0, len(text)
        for i in range(start + 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth < 0:
                end = i
                break
        value = text[start + len("(default: "):end]
        return value.strip(), (text[:start].rstrip() + text[end + 1:]).strip()
    if action.required:
        return "required", text
    if isinstance(action, argparse._StoreTrueAction):
        return "off", text
    value = action.default
    if value is None:
        return "none", text
    if isinstance(value, bool):
        return str(value).lower(), text
    return str(value), text


def values_of(action: argparse.Action) -> str:
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if getattr(action.type, "__name__", "") == "str2bool":
        return "`true` \\| `false`"
    if action.nargs == "?" and action.const is True:
        return f"nothing or `{action.metavar}`"
    return ""


def flag_name(action: argparse.Action) -> str:
    return ", ".join(action.option_strings) or (action.metavar or action.dest)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def documented(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    """(group title, action) of every flag and positional argument but --help and the subcommand choice."""
    out = []
    for group in parser._action_groups:
        for action in group._group_actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            out.append((group.title or "", action))
    return out


def stage_tables(stage_scripts: list[Script]) -> list[str]:
    """The stage scripts share one parser: a flag is one row where every script gives it the same default
    and help, else one row per variant, naming its scripts."""
    short = {s.name: s.name.removesuffix(".py") for s in stage_scripts}
    parsed = {s.name: documented(s.parser()) for s in stage_scripts}
    groups: dict[str, dict[str, dict[tuple[str, str, str], list[str]]]] = {}
    for name, actions in parsed.items():
        for title, action in actions:
            default, help_text = split_default(action)
            variants = groups.setdefault(title, {}).setdefault(flag_name(action), {})
            variants.setdefault((default, values_of(action), help_text), []).append(short[name])
    lines = ["## Which script takes which flag", "",
             "`x`: the script takes the flag. `bash run` and its `extra` variable hand every stage the same flags, "
             "and each stage gets those its script takes (`python -m utils.config STAGE FLAGS...` prints them); a "
             "flag that no script takes stops the run.", "",
             "| flag | " + " | ".join(short.values()) + " |", "|---|" + "---|" * len(short)]
    takes = {name: {flag_name(a) for _, a in actions} for name, actions in parsed.items()}
    for variants_by_flag in groups.values():
        for flag in variants_by_flag:
            lines.append(f"| `{flag}` | " + " | ".join("x" if flag in takes[n] else "" for n in short) + " |")
    for title, variants_by_flag in groups.items():
        lines += ["", f"## {title[0].upper() + title[1:]}", "", "| flag | scripts | default | values | meaning |",
                  "|---|---|---|---|---|"]
        for flag, variants in variants_by_flag.items():
            for (default, values, help_text), names in variants.items():
                where = "all" if len(names) == len(short) else ", ".join(names)
                lines.append(f"| `{flag}` | {where} | {cell(default)} | {values} | {cell(help_text)} |")
    return lines


def row(action: argparse.Action) -> str:
    default, help_text = split_default(action)
    return f"| `{flag_name(action)}` | {cell(default)} | {values_of(action)} | {cell(help_text)} |"


def parser_tables(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of a script without stages: its own, then those every subcommand takes (once), then each
    subcommand's others."""
    head = ["| flag | default | values | meaning |", "|---|---|---|---|"]
    lines = head + [row(a) for _, a in documented(parser)] + [""] if documented(parser) else []
    commands = {c: [row(a) for _, a in documented(sub)] for c, sub in subparsers(parser).items()}
    shared = [r for r in next(iter(commands.values()), []) if all(r in rows for rows in commands.values())]
    if len(commands) > 1 and shared:
        lines += [f"Every subcommand of `{name}` takes:", ""] + head + shared + [""]
    for command, rows in commands.items():
        own = [r for r in rows if len(commands) < 2 or r not in shared]
        lines += [f"### {name.removesuffix('.py')} {command}", ""]
        lines += (head + own if own else ["No other flags." if shared and len(commands) > 1 else "No flags."]) + [""]
    return lines[:-1]


FLAGS_INTRO = """\
Every script's flags, their defaults and what they mean, written from the scripts' parsers by
`{command}` (do not edit this page by hand: run that command after changing a flag). `--help` on any
script prints the same.

The stage scripts share one parser (`utils/config.py`) with the upstream flag names, and each script
offers only the flags its code reads: `segment_images.py --lr 0.1` or `test_tr.py --resume` stop with
`error: unrecognized arguments: ...`. Booleans take `true/false/yes/no`. Every numeric flag is
range-checked when the flags are read (the range is in brackets after its meaning): a value outside
stops with one line, e.g. `error: argument --batch_size: expected an integer >= 1, got 0`, and exit
status 2, before anything is read or written. `--epoch 0` and `--max_steps 0` are allowed: they save
the untrained artifact (a baseline). `--lr` is per process and scaled by the world size; the artifact's
JSON records the scaled value. Resolutions default per dataset and structure
(`loader/datasets_table.py`, [the datasets table](data.md#dataset-settings)), rounded up to the patch
(DINOv2: 322).

Why some flags are absent from a script: a TR head validates and is tested on its training grid
(`--train_resolution`), an MLP head at `--test_resolution`; the mediator trains the codebook alone (no
head widths); the k-means baseline uses neither the codebook nor any artifact; evaluation has no
randomness (no `--seed`); `segment_images.py` reads one image at a time (no loader flags).
"""


def render_flags() -> str:
    found = list(scripts().values())
    stage_scripts = [s for s in found if s.stage is not None]
    lines = ["# Flags", "", f"<!-- generated by {COMMAND} from the parsers: do not edit -->", "",
             FLAGS_INTRO.format(command=COMMAND).rstrip(), "", "Stage scripts: " +
             ", ".join(f"`{s.name}`" for s in stage_scripts) + ". Other scripts: " +
             ", ".join(f"[`{s.name}`](#{anchor(s.name)})" for s in found if s.stage is None) + ".", ""]
    lines += stage_tables(stage_scripts)
    for script in (s for s in found if s.stage is None):
        parser = script.parser()
        lines += ["", f"## {script.name}", "", " ".join((parser.description or "").split()), ""]
        lines += parser_tables(script.name, parser)
    return "\n".join(lines) + "\n"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# ---------------------------------------------------------------------------------------------- tables
FAMILIES = {"dino": "DINO", "dinov2": "DINOv2", "dinov3": "DINOv3", "ibot": "iBOT", "msn": "MSN", "mae": "MAE"}
SIZES = {"small": "S", "small_plus": "S+", "base": "B", "large": "L"}
DATASET_NAMES = {"cocostuff27": "COCO-Stuff", "cityscapes": "Cityscapes", "pascalvoc": "Pascal VOC",
                 "coco81": "COCO-81", "coco171": "COCO-171"}


def backbone_title(name: str) -> str:
    """dino_vit_small_8 -> DINO ViT-S/8; dinov2_vit_base_14_reg4 -> DINOv2 ViT-B/14 (4 registers)."""
    m = re.fullmatch(r"([a-z0-9]+)_vit_([a-z_]+?)_(\d+)(_reg4)?", name)
    if m is None:
        return name
    family, size, patch, registers = m.groups()
    return (f"{FAMILIES.get(family, family)} ViT-{SIZES.get(size, size)}/{patch}"
            + (" (4 registers)" if registers else ""))


def render_backbones() -> str:
    from downloads.sources import BACKBONES
    lines = ["| `--ckpt checkpoint/...` | model | official release file | size | in the published CAUSE | download |",
             "|---|---|---|---|---|---|"]
    for name, b in BACKBONES.items():
        how = f"`python download.py backbone {name}" + ("`" if b.url else " --url '<signed link>'` (gated)")
        lines.append(f"| `{name}.pth` | {backbone_title(name)} | `{b.release}` | ~{b.approx_mb} MB | "
                     f"{'yes' if b.published else 'no'} | {how} |")
    return "\n".join(lines)


def render_datasets() -> str:
    from downloads.sources import DATASET_SOURCES
    from loader.datasets_table import DATASETS
    archive = {served: name for name, d in DATASET_SOURCES.items() for served in d.serves}
    lines = ["| `--dataset` | classes | pre-cropped training set | train resolution TR / MLP | test resolution "
             "| stage 2 weight decay | clip TR / MLP | published stage 3 clips | K / p / batch of `bash run` "
             "| download |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in DATASETS.items():
        get = f"`python download.py dataset {archive[name]}`" if name in archive else "-"
        lines.append(f"| `{name}` | {s.n_classes} | {s.crop_type or 'none'} | {s.train_resolution_tr} / "
                     f"{s.train_resolution_mlp} | {s.test_resolution} | {s.weight_decay:g} | {s.clip_tr:g} / "
                     f"{s.clip_mlp:g} | {'yes' if s.published_stage3_clip else 'no'} | {s.num_codebook} / "
                     f"{s.projection_dim} / {s.batch_size} | {get} |")
    return "\n".join(lines)


def inferred(dataset: str) -> bool:
    """The published code has no setting for this dataset (its stage 2 raises NotImplementedError, its stage 3
    has no clip value): the row's recipe is partly inferred."""
    from loader.datasets_table import DATASETS
    return not DATASETS[dataset].published_stage3_clip


def render_published(commands: bool) -> str:
    from downloads.sources import PUBLISHED
    head = "| dataset | method | backbone | mIoU | pAcc |" + (" reproduce |" if commands else "")
    lines = [head, "|---|---|---|:-:|:-:|" + ("---|" if commands else "")]
    for r in PUBLISHED:
        line = (f"| {DATASET_NAMES.get(r.dataset, r.dataset)} | CAUSE-{r.structure} | {backbone_title(r.backbone)} | "
                f"{r.miou:.1f} | {'-' if r.pacc is None else f'{r.pacc:.1f}'} |")
        if commands:
            line += (f" `recipe=published dataset={r.dataset} structure={r.structure} "
                     f"ckpt=checkpoint/{r.backbone}.pth bash run`"
                     + (" (recipe partly inferred)" if inferred(r.dataset) else "") + " |")
        lines.append(line)
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "backbones": render_backbones,
    "datasets": render_datasets,
    "published-table": lambda: render_published(commands=False),
    "published-rows": lambda: render_published(commands=True),
}
BLOCK = re.compile(r"(<!-- BEGIN generated (?P<name>[\w-]+)[^>]*-->\n)(?P<body>.*?)(<!-- END generated (?P=name) -->)",
                   re.DOTALL)


def fill_blocks(text: str) -> str:
    """`text` with the body of every generated block rendered anew (an unknown block name is an error)."""
    def fill(m: re.Match) -> str:
        if m["name"] not in BLOCKS:
            raise SystemExit(f"error: unknown generated block {m['name']!r}: expected one of {', '.join(BLOCKS)}")
        return f"{m[1]}{BLOCKS[m['name']]()}\n{m[4]}"
    return BLOCK.sub(fill, text)


def expected(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file's path -> the content it should have now."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    out = {p: fill_blocks(p.read_text()) for p in pages if p.exists() and BLOCK.search(p.read_text())}
    out[root / FLAGS_PAGE] = render_flags()
    return out


def out_of_date(root: Path = ROOT) -> list[Path]:
    return [p for p, text in expected(root).items() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/flags.md and the generated tables of the docs.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = out_of_date()
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected().items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
