"""The documentation's shape: README.md stays a short front door, and every relative Markdown link in
README.md and docs/*.md resolves to a file of the repository (and, with a #fragment, to a heading in it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def _repo_root() -> Path:
    """The directory holding pyproject.toml, wherever under tests/ this file sits."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").exists():
            return parent
    raise FileNotFoundError(f"no pyproject.toml above {__file__}; run the tests from a checkout")


REPO = _repo_root()
README_MAX_LINES = 300
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    """Targets of the Markdown links and images outside code, in order."""
    return LINK.findall(_prose(text))


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces to hyphens, and a
    -1, -2, ... suffix on repeats."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        seen = counts.get(slug, 0)
        counts[slug] = seen + 1
        anchors.add(slug if seen == 0 else f"{slug}-{seen}")
    return anchors


def broken_links(doc: Path) -> list[str]:
    """Each relative link of `doc` whose file, or heading, does not exist, as 'target (why)'."""
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in link_targets(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif fragment and path.suffix == ".md" and fragment not in heading_anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{fragment} in {path.name})")
    return broken


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    assert broken_links(doc) == [], f"{doc.relative_to(REPO)} links to what does not exist; fix the link or the target"


def test_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}); move reference "
                                       f"material into docs/ (CLI.md, OPERATIONS.md, BENCHMARKS.md, ...)")


def test_readme_links_every_doc() -> None:
    readme = link_targets((REPO / "README.md").read_text(encoding="utf-8"))
    unlinked = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in {t.partition("#")[0] for t in readme}]
    assert unlinked == [], f"docs not reachable from README.md: {unlinked}; add them to 'Where to read more'"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "OTHER.md").write_text("# Known gaps\n\n## Known gaps\n", encoding="utf-8")
    doc = tmp_path / "DOC.md"
    doc.write_text("# Title\n"
                   "[ok](OTHER.md) [ok anchor](OTHER.md#known-gaps-1) [self](#title) [web](https://example.com/x)\n"
                   "[missing](NOPE.md) ![missing image](img/none.png) [bad anchor](OTHER.md#nope)\n"
                   "`[not a link](NOPE2.md)`\n```\n[not a link either](NOPE3.md)\n```\n", encoding="utf-8")
    assert [b.split(" ")[0] for b in broken_links(doc)] == ["NOPE.md", "img/none.png", "OTHER.md#nope"]
