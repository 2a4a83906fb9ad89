"""The README and docs/ link to files and headings that exist, and every file in docs/ is reachable from the README.

Anchors follow GitHub's rule for heading ids: lower-case, punctuation other than '-' and '_' dropped, spaces
turned into '-', a repeated heading suffixed '-1', '-2', ...
"""

import re
from collections import deque
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# [text](target) and ![alt](target), with an optional "title"; the text may hold `code` but no nested brackets
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '#' comment in a bash block is no heading, a '[x](y)' no link)."""
    lines, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = stripped[:3]
        if fence is None and marker in ("```", "~~~"):
            fence = marker
        elif fence is not None and stripped.startswith(fence):
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text."""
    anchors, seen = set(), {}
    for line in _prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_targets(text: str) -> list[str]:
    """Every inline, image and reference link target outside code (inline `code` spans are left out too)."""
    targets = []
    for line in _prose_lines(text):
        line = _strip_code_spans(line)
        targets += INLINE_LINK.findall(line)
        match = REFERENCE_LINK.match(line)
        if match:
            targets.append(match.group(1))
    return targets


def _strip_code_spans(line: str) -> str:
    """Drops `code` spans, except one that is a link's whole text: `[a](b)` shown as code is no link."""
    return re.sub(r"(?<!\[)`[^`]*`(?!\])", "``", line)


def broken_links(markdown: Path) -> list[str]:
    """'file: target (why)' for each relative link of a markdown file that points at nothing."""
    text = markdown.read_text(encoding="utf-8")
    problems = []
    for target in link_targets(text):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address: not checked offline
        path_part, _, anchor = target.partition("#")
        resolved = (markdown.parent / unquote(path_part)).resolve() if path_part else markdown
        if not resolved.exists():
            problems.append(f"{markdown.name}: {target} (no file {resolved})")
            continue
        if anchor:
            if resolved.suffix != ".md":
                problems.append(f"{markdown.name}: {target} (an anchor into a file that is not markdown)")
            elif anchor.lower() not in heading_anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{markdown.name}: {target} (no heading #{anchor} in {resolved.name})")
    return problems


def reachable_from(start: Path) -> set[Path]:
    """Every file reached from a markdown file by following relative links through markdown files."""
    seen, queue = {start.resolve()}, deque([start.resolve()])
    while queue:
        markdown = queue.popleft()
        for target in link_targets(markdown.read_text(encoding="utf-8")):
            path_part = target.partition("#")[0]
            if not path_part or SCHEME.match(target):
                continue
            resolved = (markdown.parent / unquote(path_part)).resolve()
            if resolved.exists() and resolved not in seen:
                seen.add(resolved)
                if resolved.suffix == ".md":
                    queue.append(resolved)
    return seen


MARKDOWN_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("markdown", MARKDOWN_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(markdown: Path) -> None:
    assert broken_links(markdown) == []


def test_every_docs_file_is_reachable_from_the_readme() -> None:
    reached = reachable_from(ROOT / "README.md")
    unreached = [path.name for path in sorted(DOCS.iterdir()) if path.is_file() and path.resolve() not in reached]
    assert unreached == [], f"docs/ files no link from README.md leads to: {unreached}"


def test_the_checker_reports_a_missing_file_a_missing_image_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: with `code`, punctuation\n")
    (tmp_path / "chart.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine anchor](other.md#a-section-with-code-punctuation) [self](#page)\n"
        "![fine image](chart.png) [web](https://example.org/missing.md) `[code](not-a-link.md)`\n"
        "[gone](missing.md) ![gone image](missing.png) [bad anchor](other.md#no-such-heading) [bad self](#nowhere)\n"
        "```bash\n# not a heading\n[not](checked.md)\n```\n"
        "[ref]: also-missing.md\n"
    )
    problems = broken_links(page)
    assert [problem.split(" (")[0] for problem in problems] == [
        "page.md: missing.md",
        "page.md: missing.png",
        "page.md: other.md#no-such-heading",
        "page.md: #nowhere",
        "page.md: also-missing.md",
    ]


def test_heading_anchors_follow_githubs_rule() -> None:
    text = "# The CPU study: three seeds, paired\n## Options (`--peft lora`)\n## Options (`--peft lora`)\n"
    assert heading_anchors(text) == {
        "the-cpu-study-three-seeds-paired",
        "options---peft-lora",
        "options---peft-lora-1",
    }
