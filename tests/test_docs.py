"""The manual is checked against the code: generated pages are current, every relative link and #anchor
resolves, and every `python X.py ...` shown in a code block names a subcommand and flags the script takes."""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tools import gen_docs
from tools.scripts import ROOT, Script, option_strings, scripts, subparsers

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose_and_code(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each block as (language, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
                blocks.append((line.strip().lstrip("`~").strip(), block))
            else:
                block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    return prose, blocks


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of a page: lowercase, punctuation dropped, spaces -> '-', a repeated
    heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_and_code(text)[0]:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = gen_docs.anchor(m.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` (outside code) whose file or #anchor does not exist."""
    bad = []
    for line in prose_and_code(page.read_text())[0]:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not ours to check
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no file {dest})")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
                bad.append(f"{page.name}: {target} (no heading with anchor #{fragment} in {dest.name})")
    return bad


def commands(block: list[str]) -> list[list[str]]:
    """The shell commands of a code block: continuation lines joined, comments dropped, split at ; && ||
    and |, each as its words."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(block))
    out = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split("#", 1)[0].split()
        command: list[str] = []
        for word in words + [";"]:
            if word in (";", "&&", "||", "|"):
                if command:
                    out.append(command)
                command = []
            else:
                command.append(word.strip("[]"))
    return out


def flag_problems(words: list[str], known: dict[str, Script]) -> list[str]:
    """What is wrong with the script call in `words` (an unknown subcommand or flag), if it calls one."""
    at = next((i for i, w in enumerate(words) if Path(w).name in known and w.endswith(".py")), None)
    if at is None or words[0] not in ("python", "python3", "torchrun"):  # a file tree or prose, not a call
        return []
    script = known[Path(words[at]).name]
    parser = script.parser()
    accepted = option_strings(parser)
    rest = words[at + 1:]
    commands_of = subparsers(parser)
    if commands_of:
        if not rest or rest[0] not in commands_of:
            return [f"{script.name}: no subcommand {rest[0] if rest else '(none)'!r}: expected one of "
                    f"{', '.join(commands_of)}"]
        accepted |= option_strings(commands_of[rest[0]])
        rest = rest[1:]
    problems = []
    passthrough = False
    for word in rest:
        if word == "--":  # reproduce.py: stage flags follow, for every stage that takes them
            passthrough = True
            accepted = set().union(*(option_strings(s.parser()) for s in known.values() if s.stage))
        elif word.startswith("--") and word.split("=", 1)[0] not in accepted:
            problems.append(f"{script.name}: {'stage flag' if passthrough else 'flag'} {word.split('=', 1)[0]} "
                            f"is not one it takes")
    return problems


def shown_problems(page: Path, known: dict[str, Script]) -> list[str]:
    """Script calls with unknown subcommands or flags, in the shell code blocks of `page` and in its inline
    code that starts with `python ` or `torchrun `."""
    prose, blocks = prose_and_code(page.read_text())
    shown = [words for language, block in blocks if language in ("", "bash", "sh", "shell", "console")
             for words in commands(block)]
    shown += [words for line in prose for span in re.findall(r"`((?:python3?|torchrun) [^`]*)`", line)
              for words in commands([span])]
    return [f"{page.name}: {p}: {' '.join(words)}" for words in shown for p in flag_problems(words, known)]


# ----------------------------------------------------------------------- the checkers on made-up cases

def test_anchors_follow_github_rules() -> None:
    text = "# Signals, preemption and requeue\n## `--resume` and Ctrl-C!\n```\n# not a heading\n```\n## A b\n## A b\n"
    assert anchors(text) == {"signals-preemption-and-requeue", "--resume-and-ctrl-c", "a-b", "a-b-1"}
    assert gen_docs.anchor("download.py") == "downloadpy"
    assert gen_docs.anchor("Install: what runs where") == "install-what-runs-where"


def test_broken_links_finds_a_missing_page_and_anchor(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B\n## Real one\n")
    page = tmp_path / "a.md"
    page.write_text("# A\n[ok](b.md#real-one) [self](#a) [web](https://x.org/#y) `[code](nope.md)`\n"
                    "[gone](c.md) [typo](b.md#real-on)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == [f"a.md: c.md (no file {tmp_path / 'c.md'})",
                                  "a.md: b.md#real-on (no heading with anchor #real-on in b.md)"]


def test_flag_problems_finds_unknown_flags_and_subcommands() -> None:
    known = scripts()
    block = ["python train_mediator.py --dataset toy --epoch 1 \\", "    --no_such_flag 3  # --also_not_checked",
             "torchrun --nproc_per_node 2 test_tr.py --lr 0.1 && python download.py fetch x",
             "python reproduce.py run --launcher slurm -- --val_images 5 --bogus 1",
             "python segment_images.py --input a --out b [--crf true]"]
    found = [p for words in commands(block) for p in flag_problems(words, known)]
    assert found == ["train_mediator.py: flag --no_such_flag is not one it takes",
                     "test_tr.py: flag --lr is not one it takes",
                     "download.py: no subcommand 'fetch': expected one of list, backbone, dataset, published",
                     "reproduce.py: stage flag --bogus is not one it takes"]


def test_a_new_flag_shows_in_the_flags_page_and_a_help_default_moves_to_its_column() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=None, help="processes (default: min(8, CPUs - 1)); 0: none")
    p.add_argument("--fast", action="store_true", help="go fast")
    rows = gen_docs.parser_tables("x.py", p)
    assert rows[2:] == ["| `--nproc` | min(8, CPUs - 1) |  | processes; 0: none |", "| `--fast` | off |  | go fast |"]


# ----------------------------------------------------------------------- the manual itself

def test_generated_docs_are_current() -> None:
    stale = [str(p.relative_to(ROOT)) for p in gen_docs.out_of_date()]
    assert stale == [], f"out of date: {', '.join(stale)}; regenerate with: {gen_docs.COMMAND}"


def test_an_edited_generated_table_is_out_of_date(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    page = tmp_path / "docs" / "backbones.md"
    page.write_text(page.read_text().replace("| `dino_vit_base_8.pth` | DINO ViT-B/8 |", "| `dino_vit_base_8.pth` | X |"))
    assert [p.relative_to(tmp_path) for p in gen_docs.out_of_date(tmp_path)] == [Path("docs/backbones.md")]


def test_every_relative_link_and_anchor_resolves() -> None:
    assert len(PAGES) > 10 and (ROOT / "docs" / "cluster.md") in PAGES
    assert [b for page in PAGES for b in broken_links(page)] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_shown_name_flags_and_subcommands_the_scripts_take(page: Path) -> None:
    assert shown_problems(page, scripts()) == []


def test_signals_are_described_once() -> None:
    """Only cluster.md describes the exit statuses of a stop and the SLURM signal option; the rest link there."""
    describing = [p.name for p in PAGES if "--signal=" in p.read_text() or "exits 130" in p.read_text()
                  or "exit status **130" in p.read_text()]
    assert describing == ["cluster.md"]
    assert "signals-preemption-and-requeue" in anchors((ROOT / "docs" / "cluster.md").read_text())


def test_readme_is_a_front_door_and_ci_runs_its_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if line.startswith("python -m pytest"))
    assert test_command in readme and "bash run" in readme
    assert "ruff check" in ci


def test_shown_problems_reads_shell_blocks_and_inline_calls(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("Run `python download.py fetch x`; `segment_images.py --lr 1` is refused.\n"
                    "```python\nx = 1  # python test_tr.py --in_python\n```\n```bash\npython test_tr.py --nope\n```\n")
    assert shown_problems(page, scripts()) == [
        "p.md: test_tr.py: flag --nope is not one it takes: python test_tr.py --nope",
        "p.md: download.py: no subcommand 'fetch': expected one of list, backbone, dataset, published: "
        "python download.py fetch x"]
