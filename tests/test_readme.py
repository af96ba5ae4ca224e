"""The README is the user's door: its quick start runs as written, and every relative link in
README.md and docs/*.md points to a file that exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^```([\w+-]*)\s*\n(.*?)^```\s*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def section(text: str, heading: str) -> str:
    """The text under the ``## heading`` line, up to the next heading of level 1 or 2."""
    m = re.search(rf"^## {re.escape(heading)}\s*$", text, re.M)
    assert m, f"README.md has no '## {heading}' section"
    end = re.search(r"^#{1,2} ", text[m.end():], re.M)
    return text[m.end(): m.end() + end.start() if end else len(text)]


def quick_start_blocks():
    body = section(README.read_text(encoding="utf-8"), "Quick start")
    return [code for lang, code in FENCE.findall(body) if lang == "python"]


def test_quick_start_runs_as_written():
    """Every ```python block of the 'Quick start' section, in order, in one namespace: the first
    converts DeiT-S and runs it; the next ones continue with its names (``fast``)."""
    pytest.importorskip("timm")
    blocks = quick_start_blocks()
    assert blocks, "no ```python block under '## Quick start'"
    ns = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md quick start, block {i + 1}", "exec"), ns)
    logits = ns["logits"]
    assert tuple(logits.shape) == (8, 1000)
    assert bool(logits.isfinite().all())


def markdown_files():
    return [README] + DOCS


def relative_links(path: Path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                      # http(s)://, mailto:, an anchor in the same page
        yield target


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    missing = []
    for target in relative_links(path):
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)}: links to missing files: {missing}"


def test_readme_stays_a_door():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 230, f"README.md has {n} lines; move details into docs/"
