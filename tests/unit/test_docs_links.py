"""Every relative link and every repository path named in README.md and docs/*.md exists."""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("ng_jax", "docs", "tests", "benchmarks", "launch", "notebooks", ".ci")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")                       # [text](target)
PATH = re.compile(r"(?<![\w/.-])((?:%s)/[\w./{},*-]*[\w/}*])" % "|".join(re.escape(t) for t in TOP))


def referenced_paths(text: str, doc: pathlib.Path) -> set[pathlib.Path]:
    """Relative link targets (relative to the document) and repository paths (relative to the root);
    paths with placeholders (NAME, {a,b}, *, <...>) are not checked."""
    out = set()
    for target in LINK.findall(text):
        if not re.match(r"^[a-z]+:", target):  # not http:, mailto:, ...
            out.add((doc.parent / target).resolve())
    for path in PATH.findall(text):
        if re.search(r"[A-Z]{3,}|[{}*<>]|\.\.\.", path):
            continue
        out.add((REPO / path.rstrip(".")).resolve())
    return out


def test_the_checker_sees_links_and_paths(tmp_path):
    doc = tmp_path / "x.md"
    text = "see [a](docs/A.md) and `ng_jax/rl/loop.py`, https://x.org/ng_jax/y, ng_jax/configs/NAME.py, ng_jax/configs/{a,b}.py"
    found = referenced_paths(text, doc)
    assert (tmp_path / "docs/A.md").resolve() in found
    assert (REPO / "ng_jax/rl/loop.py").resolve() in found
    assert not any("NAME" in str(p) or "{" in str(p) for p in found)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_referenced_path_exists(doc):
    missing = sorted(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)
                     for p in referenced_paths(doc.read_text(), doc) if not p.exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
