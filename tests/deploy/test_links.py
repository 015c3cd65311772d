"""Every relative link in README.md, CHANGELOG.md and docs/ names a file or directory that
exists (the anchor, if any, is not checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code blocks
    links = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute (https:, mailto:) or within the page
        links.append(target)
    return links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = [
        link for link in relative_links(page) if not (page.parent / link.split("#", 1)[0]).exists()
    ]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_links_the_deploy_guide():
    assert "docs/deploy.md" in relative_links(ROOT / "README.md")
