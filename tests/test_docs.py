"""The documentation stays a front door plus pages that hold together.

    README.md              at most README_MAX_LINES lines
    every *.md of the repository (README.md, docs/, launch/, data/)
                           every relative link and image target resolves to a file or
                           directory of the repository, and a `#anchor` to a heading of
                           the markdown file it names (or of the page itself)
    docs/ARCHITECTURE.md   exists, every `jaxtrain/...` path it names in code exists, and
                           it names every module of the package

Links are markdown's `[text](target)`, `![alt](target)` and `[label]: target`, outside
code blocks and code spans; http(s) and mailto targets are not checked, and a target is
resolved against the directory of the file that holds it (a leading `/` against the
repository root). Anchors are GitHub's heading slugs. Plain text only: no JAX, nothing
imported from jaxtrain.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
MARKDOWN = [REPO / "README.md", *(page for d in ("docs", "launch", "data") for page in sorted((REPO / d).glob("*.md")))]

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_UNCHECKED = ("http://", "https://", "mailto:")
_PACKAGE_PATH = re.compile(r"(?<![\w/.])jaxtrain/[\w./-]*")


def _blank(text: str) -> str:
    """The same text with every character but newlines replaced by a space, so offsets
    and line numbers stay those of the original."""
    return re.sub(r"[^\n]", " ", text)


def _split_code(text: str) -> tuple[str, list[tuple[int, str]]]:
    """(the text with fenced blocks and code spans blanked, [(line, code) of each])."""
    prose, code, fence = [], [], None
    for number, line in enumerate(text.split("\n"), 1):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0] * len(opened.group(1))
            prose.append(_blank(line))
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            else:
                code.append((number, line))
            prose.append(_blank(line))
        else:
            prose.append(line)
    joined = "\n".join(prose)
    for span in _CODE_SPAN.finditer(joined):
        code.append((joined.count("\n", 0, span.start()) + 1, span.group(2)))
    return _CODE_SPAN.sub(lambda m: _blank(m.group(0)), joined), code


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code."""
    prose, _ = _split_code(text)
    found = [(m.start(1), m.group(1)) for m in _INLINE_LINK.finditer(prose)]
    found += [(m.start(1), m.group(1)) for m in _REFERENCE.finditer(prose)]
    return [(prose.count("\n", 0, start) + 1, target) for start, target in sorted(found)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown text's headings: lower case, punctuation but '-' and
    '_' dropped, spaces to '-', a repeated slug numbered -1, -2, ..."""
    prose, _ = _split_code(re.sub(r"`([^`]*)`", r"\1", text))  # a heading's code span keeps its text
    found, seen = set(), Counter()
    for heading in re.findall(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


def broken_links(text: str, where: Path) -> list[str]:
    """`FILE:LINE: broken link 'TARGET'` for every relative link of `text` (the content of
    the markdown file `where`) that names nothing in the repository, or a heading that
    the markdown file it names does not have."""
    bad = []
    for line, target in links(text):
        if not target or target.lower().startswith(_UNCHECKED):
            continue
        path, _, anchor = unquote(target).partition("#")
        resolved = ((REPO / path.lstrip("/")) if path.startswith("/") else (where.parent / path)).resolve()
        inside = resolved == REPO or REPO in resolved.parents
        if not (inside and resolved.exists()):
            why = "outside the repository" if not inside else f"no such file or directory {resolved.relative_to(REPO)}"
            bad.append(f"{where.relative_to(REPO)}:{line}: broken link {target!r} ({why})")
        elif anchor and resolved.suffix == ".md":
            headings = anchors(text if resolved == where.resolve() else resolved.read_text())
            if anchor not in headings:
                bad.append(f"{where.relative_to(REPO)}:{line}: broken link {target!r} "
                           f"(no heading #{anchor} in {resolved.relative_to(REPO)})")
    return bad


def test_readme_is_a_front_door():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md: {lines} lines, more than {README_MAX_LINES}: "
                                       "move the detail into a docs/ page and link it")


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    bad = broken_links(page.read_text(), page)
    assert not bad, "\n".join(bad)


def test_the_link_checker_sees_a_broken_link():
    """Not vacuous: planted broken links, images and anchors are reported with file, line
    and target, while good, external, anchor and in-code links are not."""
    page = REPO / "docs" / "planted.md"
    text = ("# Planted `here`, twice\n"
            "[good](usage.md#tests) [up](../README.md) [web](https://example.com/x) [anchor](#planted-here-twice)\n"
            "see [gone](no_such_page.md#part) and ![missing](img/none.png)\n"
            "`[in code](not_checked.md)`\n"
            "```\n[in a block](also_not_checked.md)\n```\n"
            "[ref]: ../nowhere/\n"
            "[no heading](usage.md#no-such-heading) [nor here](#tests)\n")
    assert broken_links(text, page) == [
        "docs/planted.md:3: broken link 'no_such_page.md#part' (no such file or directory docs/no_such_page.md)",
        "docs/planted.md:3: broken link 'img/none.png' (no such file or directory docs/img/none.png)",
        "docs/planted.md:8: broken link '../nowhere/' (no such file or directory nowhere)",
        "docs/planted.md:9: broken link 'usage.md#no-such-heading' (no heading #no-such-heading in docs/usage.md)",
    ]


def _architecture_paths() -> list[tuple[int, str]]:
    """(line, path) of every `jaxtrain/...` path docs/ARCHITECTURE.md names in code."""
    _, code = _split_code(ARCHITECTURE.read_text())
    return [(line, path.rstrip(".,;:")) for line, text in code for path in _PACKAGE_PATH.findall(text)]


def test_architecture_names_only_files_that_exist():
    assert ARCHITECTURE.is_file(), "docs/ARCHITECTURE.md is missing (README.md links it)"
    checked = [(line, path) for line, path in _architecture_paths() if "*" not in path and path.endswith((".py", "/"))]
    assert any(path.endswith(".py") for _, path in checked), "docs/ARCHITECTURE.md names no jaxtrain/...py file"
    missing = [f"docs/ARCHITECTURE.md:{line}: names {path!r}, which does not exist"
               for line, path in checked if not (REPO / path).exists()]
    assert not missing, "\n".join(missing)


def test_architecture_names_every_module():
    """A module added to the package is placed on the map (its path in a code block or span)."""
    named = {path for _, path in _architecture_paths()}
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "jaxtrain").rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if m not in named]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
