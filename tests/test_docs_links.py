"""The README and the pages in docs/: every relative link and image leads to a file of the repository
(and a ``#anchor`` to a heading of its page), and the README stays a short front door."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 320

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+(?:\([^()\s]*\))?)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: Path) -> list[str]:
    text = _prose(page.read_text(encoding="utf-8"))
    return [m.group(1) for m in LINK.finditer(text)] + [m.group(1) for m in HTML_REF.finditer(text)]


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto:, ...


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_images_resolve(page):
    broken = []
    for target in filter(_relative, links(page)):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / unquote(path_part)).resolve() if path_part else page
        if REPO not in destination.parents and destination != REPO:
            broken.append(f"{target}: outside the repository")
        elif not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_pages_link_something():
    """The link pattern finds the README's links (so an empty result above means no links, not a bad regex)."""
    found = links(REPO / "README.md")
    assert "docs/training.md" in found and any(t.startswith("docs/conversion.md#") for t in found)
    assert any(t.startswith("healing-study/") for t in links(REPO / "docs" / "studies.md"))


def test_every_docs_page_is_linked_from_the_readme():
    named = {target.partition("#")[0] for target in links(REPO / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if str(p.relative_to(REPO)) not in named]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_is_a_short_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_slugs_follow_github():
    assert _slug("Serving with vLLM and llama.cpp") == "serving-with-vllm-and-llamacpp"
    assert _slug("Does LNS pay off on my model? The healing study") == "does-lns-pay-off-on-my-model-the-healing-study"
    assert _slug("What runs, and what is isolated") == "what-runs-and-what-is-isolated"
    assert _slug("Measured: stories260K on the C4 sample") == "measured-stories260k-on-the-c4-sample"
