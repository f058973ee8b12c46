"""The README stays a page a user can walk, and nothing it or docs/ points at has moved:
the repository map names files that exist and every module of the mapped folders, every
relative link (and its #anchor) resolves, every docs/ page is linked from the README, the
README keeps its length limit and the two command blocks CI reads (.ci/readme_command.py).
Text only: milliseconds."""
from __future__ import annotations

import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 460
# every module of these folders is named in the map
MAPPED_FOLDERS = ("pipeline", "pipeline/data", "pipeline/data/stream", "data_tools", "benchmarks")
MODULE_SUFFIXES = (".py", ".sh")

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def repository_map(text: str) -> str:
    """The fenced block right after `## Repository map`."""
    match = re.search(r"^## Repository map[ \t]*\n+```[^\n]*\n(.*?)^```", text, re.M | re.S)
    assert match, "README.md: no fenced code block under '## Repository map'"
    return match.group(1)


def map_paths(block: str) -> list[tuple[int, str]]:
    """(line number, path) for every entry of the map's indented tree. An entry line is
    `NAME[, NAME...]  description`, indented less than the description column; a name
    ending in `/` is a folder and the prefix of the entries indented under it. Lines
    indented to the description column continue the description above."""
    lines = block.splitlines()
    first = re.match(r"(\S+\s{2,})", lines[0])
    assert first, f"map: no description column on its first line: {lines[0]!r}"
    column = len(first.group(1))
    folders: list[tuple[int, str]] = []  # (indent, path) of the enclosing folders
    found = []
    for number, line in enumerate(lines, 1):
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= column:
            continue
        while folders and folders[-1][0] >= indent:
            folders.pop()
        prefix = folders[-1][1] if folders else ""
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        for name in (n.strip() for n in names.split(",")):
            path = prefix + name
            found.append((number, path))
            if name.endswith("/"):
                folders.append((indent, path))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, file it names, anchor or '') for each relative link outside code
    blocks; a link to an anchor alone names `path` itself."""
    links = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        file = file.split("?", 1)[0]
        links.append((target, (path.parent / file).resolve() if file else path, anchor))
    return links


def test_the_repository_map_names_only_paths_that_exist():
    paths = map_paths(repository_map(README.read_text()))
    assert len(paths) > 50, f"the map parsed into only {len(paths)} entries: {paths}"
    missing = [f"map line {n}: {p}" for n, p in paths if not (ROOT / p).exists()]
    assert not missing, "README.md's repository map names paths that do not exist:\n" + "\n".join(missing)


def test_the_repository_map_names_every_module_of_the_mapped_folders():
    named = {p.rstrip("/") for _, p in map_paths(repository_map(README.read_text()))}
    unnamed = [f"{folder}/{f.name}" for folder in MAPPED_FOLDERS
               for f in sorted((ROOT / folder).iterdir())
               if f.suffix in MODULE_SUFFIXES and f.name != "__init__.py"
               and f"{folder}/{f.name}" not in named]
    assert not unnamed, "README.md's repository map does not name: " + ", ".join(unnamed)


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = [target for target, file, _ in relative_links(page) if not file.exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_of_a_markdown_link_names_a_heading(page):
    broken = [target for target, file, anchor in relative_links(page)
              if anchor and file.suffix == ".md" and file.exists() and anchor not in anchors(file)]
    assert not broken, f"{page.relative_to(ROOT)}: anchors that name no heading: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {file for _, file, _ in relative_links(README)}
    unlinked = [str(page.relative_to(ROOT)) for page in markdown_files()[1:] if page not in linked]
    assert not unlinked, f"README.md links no line to: {unlinked}"


def test_the_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): it says what to run and why; "
        "measurements, fault tables and details belong in docs/, linked in one line")


@pytest.mark.parametrize("name", ["demo", "tests"])
def test_the_command_blocks_ci_reads_are_there(name, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["readme_command.py", name])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(ROOT / ".ci" / "readme_command.py"), run_name="__main__")
    assert "pip install" in out.getvalue(), out.getvalue()
