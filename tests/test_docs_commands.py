"""The command lines the docs show are the ones the parser takes: every ``--flag`` written after a
``voxtui …`` command in README's command list, docs/evaluation.md's examples and docs/data.md's tool
headings is a documented option of that command (not a hidden alias, not a flag it lacks), and README's
list names every option of the commands it spells out in full."""

from __future__ import annotations

import argparse
import re

import pytest

from conftest import ROOT
from engine.cli import build_parser

FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    acts = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(acts[0].choices) if acts else {}


def visible_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def command_lines(text: str) -> list[str]:
    """``voxtui …`` lines of the fenced blocks, and the commands in ``## `voxtui …` `` headings."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and line.startswith("voxtui "):
            out.append(line.split("#")[0])
        elif m := re.match(r"^#+ `(voxtui [^`]+)`", line):
            out.append(m[1])
    return out


def parsers_named(line: str) -> tuple[list[str], list[argparse.ArgumentParser]]:
    """The command a line shows (``data analyze``) and its parser; ``engine list | status RUN | stop RUN``
    shows several: each subcommand named after the first."""
    words = [w.strip("[]|") for w in line.split()[1:]]
    parser, path = build_parser(), []
    while words and words[0] in subparsers(parser):
        path.append(words[0])
        parser = subparsers(parser)[words.pop(0)]
    siblings = subparsers(build_parser())
    for name in path[:-1]:
        siblings = subparsers(siblings[name])
    return path, [parser, *(siblings[w] for w in words if w in siblings and w != path[-1])]


DOCS = ["README.md", "docs/evaluation.md", "docs/data.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_a_doc_shows_is_a_documented_option(doc):
    lines = command_lines((ROOT / doc).read_text())
    assert lines, doc
    for line in lines:
        path, parsers = parsers_named(line)
        known = set().union(*(visible_flags(p) for p in parsers))
        wrong = [f for f in FLAG.findall(line) if f not in known]
        assert not wrong, f"{doc}: `voxtui {' '.join(path)}` has no option {', '.join(wrong)}: {line!r}"


def test_readme_lists_every_option_of_the_commands_it_spells_out():
    listed: dict[str, str] = {}
    for line in command_lines((ROOT / "README.md").read_text()):  # the command list comes first
        listed.setdefault(" ".join(parsers_named(line)[0]), line)
    for cmd in ("data analyze", "data audit", "data find-long", "data split", "engine list", "export",
                "export-metrics", "score", "attach", "demo"):
        path, (parser, *_) = parsers_named(f"voxtui {cmd}")
        line = listed[cmd]
        missing = sorted(visible_flags(parser) - set(FLAG.findall(line)))
        assert not missing, f"README's `voxtui {cmd}` line leaves out {', '.join(missing)}"


def test_data_md_says_which_tools_take_workers():
    """docs/data.md's paragraph on the worker pool names the tools with ``--workers`` and the one without."""
    text = (ROOT / "docs" / "data.md").read_text()
    para = next(p for p in text.split("\n\n") if "`--workers N`" in p)
    tools = subparsers(subparsers(build_parser())["data"])
    for name, parser in tools.items():
        if "--workers" in visible_flags(parser):
            assert f"`{name}`" in para, name
        else:
            assert f"`{name}` has no `--workers`" in para, name
