"""Every reference to a Markdown file or a test module names a file that is in the repository.

Real: the repository's own files (`git ls-files`, tracked and not ignored) and their text, read
as they are. Emulated: nothing; the tests that prove the checker can fail plant bad references in
a temporary tree and run the same checker over it.

A reader follows these references: a design note or a test module that is not in the repository
(a path outside it, a module that was renamed) sends a user or a new contributor nowhere.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The files whose text may cite a document or a test module.
CHECKED_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".lua", ".tpl", ".txt"}
CHECKED_NAMES = {"Makefile", "Dockerfile"}
#: The changelog records the tree as it was when each entry was written: its test paths may be
#: gone since. (Its Markdown references are checked: those documents must still exist.)
HISTORY = "CHANGES.md"

#: `[text](target)` in Markdown.
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: A path-like word ending in `.md`; a URL or an absolute path starts with "/" once its scheme
#: is cut off (the scheme's ':' is not a path character), and is not a repository reference.
MARKDOWN_MENTION = re.compile(r"[\w.\-/]*[\w-]\.md(?![\w.-]*\w)")
TEST_PATH = re.compile(r"(?<![\w./-])tests/[\w./-]*\.py\b")
TEST_NAME = re.compile(r"(?<![\w./-])test_\w+\.py\b")
OUTSIDE = re.compile(r"\.\./shared\b|\bshared/design/")


def checked_files(root: Path) -> list[Path]:
    """The repository's files that may carry references (tracked, or new and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    paths = (root / name for name in listed if name)
    return sorted(
        p
        for p in paths
        if p.is_file() and (p.suffix in CHECKED_SUFFIXES or p.name in CHECKED_NAMES)
    )


def problems(root: Path, files: Iterable[Path]) -> list[str]:
    """`file:line: reference — why` for every reference that leads nowhere."""
    test_names = {p.name for p in (root / "tests").rglob("test_*.py")}
    top_level = {p.name for p in root.iterdir()}
    found = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            for reference, why in _line_problems(root, path, line, test_names, top_level):
                found.append(f"{relative}:{number}: {reference} — {why}")
    return found


def _line_problems(
    root: Path, path: Path, line: str, test_names: set[str], top_level: set[str]
) -> Iterator[tuple[str, str]]:
    for match in OUTSIDE.finditer(line):
        yield match.group(), "outside the repository: a reader of the repository cannot follow it"
    linked = set()
    if path.suffix == ".md":
        for match in LINK.finditer(line):
            target = match.group(1)
            linked.add(match.span(1))
            if re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # a URL, mailto: or an anchor
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(root) or not resolved.exists():
                yield target, "the link's target is not in the repository"
    for match in MARKDOWN_MENTION.finditer(line):
        if match.span() in linked or _inside(match.span(), linked):
            continue
        reference = match.group()
        candidates = _mention_candidates(root, path, reference, top_level)
        if candidates is not None and not any(c.is_file() for c in candidates):
            yield reference, "no such Markdown file in the repository"
    if path.name == HISTORY:
        return
    for match in TEST_PATH.finditer(line):
        if not (root / match.group()).is_file():
            yield match.group(), "no such test file"
    for match in TEST_NAME.finditer(line):
        if match.group() not in test_names:
            yield match.group(), "no test module of that name under tests/"


def _inside(span: tuple[int, int], spans: set[tuple[int, int]]) -> bool:
    return any(start <= span[0] and span[1] <= end for start, end in spans)


def _mention_candidates(
    root: Path, path: Path, reference: str, top_level: set[str]
) -> list[Path] | None:
    """Where a bare mention may live; None when it is not a reference into the repository (an
    absolute path or URL, or a path like `merged/README.md` inside a run's output)."""
    if reference.startswith("/"):
        return None
    if reference.startswith(("./", "../")):
        resolved = (path.parent / reference).resolve()
        return [resolved] if resolved.is_relative_to(root) else []
    if "/" in reference:
        first = reference.split("/", 1)[0]
        return [root / reference] if first in top_level else None
    return [path.parent / reference, root / reference, root / "docs" / reference]


# ------------------------------------------------------------------------------------------ tests
def test_every_reference_in_the_repository_leads_to_a_file() -> None:
    files = checked_files(ROOT)
    assert any(p.name == "architecture.md" for p in files), "the checker reads the docs"
    assert problems(ROOT, files) == []


def md(stem: str) -> str:
    """A Markdown file name, spelt so that this module's own text names no missing file."""
    return stem + ".md"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small repository: a README, one document and one test module."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text("# Architecture\n")
    (tmp_path / "tests" / "operator").mkdir(parents=True)
    (tmp_path / "tests" / "operator" / "test_plan.py").write_text('"""Plan."""\n')
    (tmp_path / "README.md").write_text("See [the design](docs/architecture.md).\n")
    return tmp_path


def test_good_references_pass(tree: Path) -> None:
    module = tree / "operator.py"
    module.write_text(
        '"""Exit codes (docs/architecture.md, architecture.md); tests/operator/test_plan.py,\n'
        "test_plan.py. Not references: https://example.com/x.md, <output>/README.md,\n"
        'merged/README.md."""\n'
    )
    page = tree / "docs" / md("guide")
    page.write_text("[Architecture](architecture.md#parts), [home](../README.md), [x](#top)\n")
    assert problems(tree, [tree / "README.md", module, page]) == []


def test_planted_bad_references_fail(tree: Path) -> None:
    outside = "../" + "shared/" + "design/" + md("api")
    missing_page = "docs/" + md("no-such-page")
    missing_test = "tests/" + "test_observability_live" + ".py"
    module = tree / "operator.py"
    module.write_text(f'"""See {missing_page}, {missing_test} and the design at {outside}."""\n')
    page = tree / "docs" / "api.md"
    page.write_text(f"The design: [api]({outside}); [gone]({md('gone')}), {md('testing')}.\n")
    found = problems(tree, [module, page])
    assert any(missing_page in p for p in found), found
    assert any(missing_test in p and "no such test file" in p for p in found), found
    assert sum("outside the repository" in p for p in found) == 2, found
    assert any(md("gone") in p and "link" in p for p in found), found
    assert any(p.startswith("docs/api.md:1: " + md("testing")) for p in found), found


def test_the_changelog_may_name_test_modules_of_its_time(tree: Path) -> None:
    history = tree / HISTORY
    gone = "docs/" + md("gone")
    history.write_text(f"- moved from tests/{'stage_base'}.py; see {gone}\n")
    found = problems(tree, [history])
    assert found == [f"{HISTORY}:1: {gone} — no such Markdown file in the repository"]
