"""The README stays a landing page and the documentation stays honest.

- README.md has at most 250 lines;
- no line of README.md or docs/*.md cites an issue number or a test count (measured numbers live
  in benchmarks/results/, next to the command that made them; test counts go stale with every test);
- every relative link of README.md and docs/*.md points at a path that exists, and a link to a
  heading (``page.md#heading``) at a heading of that page;
- every ``slug-pl ...`` command of the README (its fenced bash blocks and its inline code) parses
  with the command's real parser, without doing the work: Lightning's commands with
  ``--print_config`` (given a config) or ``--help`` appended, the other commands up to the end of
  their argument parsing.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from slug_pl.cli import EXTRA_COMMANDS, LIGHTNING_COMMANDS, main

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 250

#: Pages that other branches add; until they are merged, links to them are accepted (their headings
#: unchecked). Remove an entry once its page is in docs/.
NOT_YET_MERGED: set[str] = {"docs/using.md"}  # using the results in your own code

ISSUE = re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE)
TEST_COUNT = re.compile(r"\b\d[\d,]*\s+(?:tests?|passed|failed)\b", re.IGNORECASE)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code (what a reader sees as links and headings)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = _anchor(heading)
        n = seen.get(base, 0)
        anchors.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return anchors


def test_readme_has_at_most_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move content into docs/"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_issue_numbers_or_test_counts(page):
    bad = [f"{_rel(page)}:{i}: {line.strip()}" for i, line in enumerate(page.read_text().splitlines(), 1)
           if ISSUE.search(line) or TEST_COUNT.search(line)]
    assert not bad, "cite no issue number or test count:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        try:
            name = _rel(resolved)
        except ValueError:
            broken.append(f"{target} (outside the repository)")
            continue
        if name in NOT_YET_MERGED and not resolved.exists():
            continue
        if not resolved.exists():
            broken.append(f"{target} ({name} does not exist)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {name})")
    assert not broken, f"broken links in {_rel(page)}:\n" + "\n".join(broken)


def _readme_commands() -> list[str]:
    """Every ``slug-pl`` command line of the README: the lines of its fenced bash blocks (with
    backslash continuations joined) and its inline code spans that start with ``slug-pl`` and give
    options (not a bare command name such as ``slug-pl compare``, nor a ``<placeholder>``)."""
    text = README.read_text()
    commands = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "shell", ""):
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip().startswith("slug-pl "):
                    commands.append(line.strip())
    for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
        if span.startswith("slug-pl ") and "<" not in span and len(shlex.split(span)) > 2:
            commands.append(span)
    return list(dict.fromkeys(commands))


COMMANDS = _readme_commands()


def test_the_readme_shows_every_command():
    shown = {shlex.split(c, comments=True)[1] for c in COMMANDS}
    assert shown >= {*LIGHTNING_COMMANDS, *EXTRA_COMMANDS}


class Parsed(BaseException):
    """Raised once a command's argument parser has accepted its words: the work is not done."""


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    words = shlex.split(command, comments=True)
    assert words[0] == "slug-pl", command
    name, args = words[1], words[2:]
    for i, word in enumerate(args[:-1]):
        if word == "--config":
            assert (REPO / args[i + 1]).is_file(), f"{command}: no config {args[i + 1]}"
    if name in LIGHTNING_COMMANDS:
        prints = any(w == "--print_config" or w.endswith(".help") for w in args)
        extra = [] if prints else ["--print_config"] if "--config" in args else ["--help"]
        with pytest.raises(SystemExit) as stop:
            main([name, *args, *extra])
        assert stop.value.code == 0, capsys.readouterr().err[-2000:]
        assert capsys.readouterr().out.strip()
    else:
        assert name in EXTRA_COMMANDS, f"{command}: unknown command {name!r}"
        parse = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, words=None, namespace=None):
            raise Parsed(parse(self, words, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(Parsed):
            main([name, *args])
