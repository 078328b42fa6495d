"""The documentation stays a front door plus pages that hold together.

    README.md              at most README_MAX_LINES lines
    every *.md of the repository (README.md, docs/, launch/, data/)
                           every relative link and image target resolves to a file or
                           directory of the repository, and a `#anchor` to a heading of
                           the markdown file it names (or of the page itself)
    docs/ARCHITECTURE.md   exists, every `jaxtrain/...` path it names in code exists, and
                           it names every module of the package

Markdown is read by a markdown parser (markdown-it-py: CommonMark, with GitHub's tables):
links are its inline links and images, reference links, and every `[label]: target`
definition, used or not; code blocks and code spans hold none. http(s) and mailto targets
are not checked, and a target is resolved against the directory of the file that holds it
(a leading `/` against the repository root). Anchors are GitHub's heading slugs. Plain text
only: no JAX, nothing imported from jaxtrain.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt, rules_inline
from markdown_it.token import Token

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
MARKDOWN = [REPO / "README.md", *(page for d in ("docs", "launch", "data") for page in sorted((REPO / d).glob("*.md")))]

# inline_definitions: each `[label]: target` becomes a token with its line (a definition no
# link uses is checked too)
_PARSER = MarkdownIt("commonmark", {"inline_definitions": True}).enable("table")
_UNCHECKED = ("http://", "https://", "mailto:")
_PACKAGE_PATH = re.compile(r"(?<![\w/.])jaxtrain/[\w./-]*")


def _noting_line_breaks(rule):
    """An inline rule whose tokens note how many line breaks of their inline run come before
    them (meta["breaks"]): a link, an image or a code span after a code span that wraps a
    line still has its own line."""
    def noted(state, silent):
        start, count = state.pos, len(state.tokens)
        if not rule(state, silent):
            return False
        for token in state.tokens[count:]:
            token.meta.setdefault("breaks", state.src.count("\n", 0, start))
        return True
    return noted


for _name, _rule in [("backticks", rules_inline.backtick), ("link", rules_inline.link),
                     ("image", rules_inline.image), ("autolink", rules_inline.autolink)]:
    _PARSER.inline.ruler.at(_name, _noting_line_breaks(_rule))


def _inline(tokens: list[Token]):
    """(the token before, the inline token) of every inline run (paragraphs, headings, table
    cells) of a parsed markdown text, in document order."""
    for before, token in zip([None, *tokens], tokens):
        if token.type == "inline":
            yield before, token


def _lines(inline: Token):
    """(line, child) of an inline token's links, images and code spans."""
    for child in inline.children or []:
        if child.type in ("link_open", "image", "code_inline"):
            yield inline.map[0] + 1 + child.meta["breaks"], child


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every markdown link, image and link definition outside code, in
    document order."""
    found = []
    for token in _PARSER.parse(text):
        if token.type == "definition":
            found.append((token.map[0] + 1, token.meta["url"]))
        for line, child in _lines(token) if token.type == "inline" else ():
            if child.type != "code_inline":
                found.append((line, child.attrs["href" if child.type == "link_open" else "src"]))
    return found


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown text's headings: the heading's text (a code span keeps
    its text, markup goes), lower case, punctuation but '-' and '_' dropped, spaces to '-',
    a repeated slug numbered -1, -2, ..."""
    found, seen = set(), Counter()
    for block, inline in _inline(_PARSER.parse(text)):
        if block.type != "heading_open":
            continue
        heading = "".join(child.content for child in inline.children if child.type in ("text", "code_inline"))
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
        if not path:  # `#anchor`: a heading of this page (which the test may not have on disk)
            if anchor not in anchors(text):
                bad.append(f"{where.relative_to(REPO)}:{line}: broken link {target!r} "
                           f"(no heading #{anchor} in {where.relative_to(REPO)})")
            continue
        resolved = ((REPO / path.lstrip("/")) if path.startswith("/") else (where.parent / path)).resolve()
        inside = resolved == REPO or REPO in resolved.parents
        if not (inside and resolved.exists()):
            why = "outside the repository" if not inside else f"no such file or directory {resolved.relative_to(REPO)}"
            bad.append(f"{where.relative_to(REPO)}:{line}: broken link {target!r} ({why})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
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
        "docs/planted.md:9: broken link '#tests' (no heading #tests in docs/planted.md)",
    ]


def _code(text: str) -> list[tuple[int, str]]:
    """(line, code) of every line of a code block and every code span of a markdown text."""
    tokens = _PARSER.parse(text)
    code = [(token.map[0] + (token.type == "fence") + number, line)  # a fence's content starts below it
            for token in tokens if token.type in ("fence", "code_block")
            for number, line in enumerate(token.content.splitlines(), 1)]
    for _, inline in _inline(tokens):
        code += [(line, child.content) for line, child in _lines(inline) if child.type == "code_inline"]
    return code


def _architecture_paths() -> list[tuple[int, str]]:
    """(line, path) of every `jaxtrain/...` path docs/ARCHITECTURE.md names in code."""
    return [(line, path.rstrip(".,;:")) for line, text in _code(ARCHITECTURE.read_text())
            for path in _PACKAGE_PATH.findall(text)]


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
