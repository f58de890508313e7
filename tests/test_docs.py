"""The documents a person reads: README stays the short front door, and every link in README.md, BENCHMARKS.md,
RESULTS.md and docs/ leads to a file (and a heading) that exists."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    wrong = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            wrong.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            wrong.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    assert not broken_links(page), "\n".join(broken_links(page))


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title here\n", encoding="utf-8")
    page.write_text("[ok](b.md#title-here) [gone](c.md) [no heading](b.md#other)\n", encoding="utf-8")
    assert broken_links(page, tmp_path) == ["a.md: c.md (no such file)", "a.md: b.md#other (no such heading)"]


def test_readme_is_short():
    """The front door: what it is, two commands, one result, the commands, links (detail lives in docs/)."""
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


SWEEP_IMPORT = re.compile(r"^\s*from (sweep(?:\.\w+)*) import ([\w, ]+)$", re.M)


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text(encoding="utf-8")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_examples_import_names_that_exist(page):
    """A reader pastes these lines: every `from sweep... import name` in a python block must import (the examples
    rotted once when the modules moved into folders)."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    missing = [f"{module}.{name.strip()}" for block in blocks for module, names in SWEEP_IMPORT.findall(block)
               for name in names.split(",") if not hasattr(importlib.import_module(module), name.strip())]
    assert not missing, missing
