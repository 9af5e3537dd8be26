"""The README and docs/*.md point at things that exist.

Every relative link, ``[text](path)`` or ``![alt](path)`` (also ``<img src>``/``<a href>`` and
reference definitions), must name an existing file or folder, relative to the page; a
``#fragment`` must name a heading of the target page (GitHub's anchors). Every repository path
written in backticks, inline or in a fenced block (``benchmarks/foo.py``, ``docs/x.md``,
``pipeline/x.py``, ``diffusion_core/x.py``, ...), must exist relative to the repository root.
Not checked: web links, and what the pipeline makes at run time (``runs/``, ``data/``,
``models/``, ``mlruns``, ``mlartifacts``, ``.venv``, its outputs in ``reports/``, ``metrics/``
and ``provenance/``).
Placeholders in a path (``<method>``, ``$VAR``, ``...``, a one-letter name such as ``M.json``) are
not paths; ``{a,b}`` is expanded and a glob must match something.
"""

from __future__ import annotations

import glob
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level folders of the repository's own files: a path into them must exist.
CHECKED = ("benchmarks", "diffusion_core", "docs", "notebooks", "pipeline", "tests", ".dvc", ".ci")
# Made at run time, so absent from a fresh clone (or, for the pipeline's outputs in reports/,
# metrics/ and provenance/, renamed or added by the next `dvc repro`): never checked.
RUNTIME = ("runs", "data", "models", "mlruns", "mlartifacts", ".venv", "dvc_plots", "mlflow.db",
           "reports", "metrics", "provenance", ".dvc/tmp", ".dvc/cache")

FENCE = re.compile(r"^(\s*)(```+|~~~+)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\)")  # every [..](dest) and ![..](dest)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HTML = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ID = re.compile(r"<[^>]+\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
PATH = re.compile(r"(?<![\w./:@$~-])(?:\./)?((?:" + "|".join(re.escape(d) for d in CHECKED)
                  + r")/[\w.\-/{},*?<>$\[\]]*)")


OPENING = {"]": "[", "}": "{"}


def pages() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in found if p.is_file()]


def outside_fences(text: str) -> tuple[list[str], list[str]]:
    """``(lines outside fenced code blocks, lines inside them)``."""
    outside, inside, fence = [], [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)[0] * len(m.group(2))
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is not None:
            inside.append(line)
        else:
            outside.append(line)
    return outside, inside


def split_code(text: str) -> tuple[list[str], list[str]]:
    """``(prose lines, code)``: the lines outside fenced blocks with inline code removed, and
    the text of every fenced block line and inline code span."""
    outside, code = outside_fences(text)
    prose = []
    for line in outside:
        code += [m.group(2) for m in INLINE_CODE.finditer(line)]
        prose.append(INLINE_CODE.sub("", line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower case, punctuation dropped, spaces
    to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every ``#fragment`` that lands on ``page``."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    lines, _ = outside_fences(page.read_text(encoding="utf-8"))
    for line in lines:
        found.update(HTML_ID.findall(line))
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def runtime(rel: str) -> bool:
    rel = rel[2:] if rel.startswith("./") else rel
    return any(rel == r or rel.startswith(r + "/") for r in RUNTIME)


def link_targets(page: Path) -> list[str]:
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    text = "\n".join(prose)
    found = [m.group(1) for m in LINK.finditer(text)]
    found += [m.group(1) for m in REFERENCE.finditer(text)]
    found += HTML.findall(text)
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in link_targets(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path_part, _, fragment = target.partition("#")
        path_part = unquote(path_part.split("?")[0])
        dest = (page.parent / path_part).resolve() if path_part else page
        try:
            rel = dest.relative_to(ROOT).as_posix()
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if runtime(rel):
            continue
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and unquote(fragment) not in anchors(dest):
            problems.append(f"{target}: no heading #{fragment} in {rel}")
    return problems


def expand(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py`` (nested braces too)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in expand(path[:m.start()] + alt + path[m.end():])]


def placeholder(path: str) -> bool:
    if any(s in path for s in ("<", ">", "$", "...")):
        return True
    return any(re.fullmatch(r"[A-Z](\.\w+)?", part) for part in path.split("/"))


def missing_paths(page: Path) -> list[str]:
    _, code = split_code(page.read_text(encoding="utf-8"))
    problems = []
    for chunk in code:
        for m in PATH.finditer(chunk):
            raw = m.group(1)
            while raw and (raw[-1] in ".,;:'\"" or (raw[-1] in "]}" and raw.count(raw[-1])
                                                       > raw.count(OPENING[raw[-1]]))):
                raw = raw[:-1]
            if raw.count("{") != raw.count("}"):
                raw = raw.split("{")[0]
            if placeholder(raw) or runtime(raw):
                continue
            for path in expand(raw):
                pattern = any(c in path for c in "*?[")
                if not (glob.glob(str(ROOT / path)) if pattern else (ROOT / path).exists()):
                    problems.append(path)
    return sorted(set(problems))


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page: Path) -> None:
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repository_paths_in_backticks_exist(page: Path) -> None:
    problems = missing_paths(page)
    assert not problems, "no such path in the repository:\n" + "\n".join(problems)


def test_the_checks_find_what_is_broken(tmp_path: Path, monkeypatch) -> None:
    """The checks themselves: a page with one good and one bad thing of each kind."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text("")
    (tmp_path / "pipeline" / "b.py").write_text("")
    other = tmp_path / "docs" / "other.md"
    other.write_text("# Other page\n\n## Bad input and faults\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Title\n\n## Sweeps with `dvc exp`\n\n"
        "[good](other.md) [good anchor](other.md#bad-input-and-faults) [here](#sweeps-with-dvc-exp)"
        " [web](https://example.org/x) [run time](../runs/train/model.pt)\n"
        "[bad](missing.md) [bad anchor](other.md#nothing) ![bad image](img/none.png)\n"
        "`pipeline/a.py`, `python pipeline/{a,b}.py --x`, `pipeline/<method>.json`, "
        "`git show abc:pipeline/gone.py`, `runs/x.pt`, `metrics/sample/M.json`\n"
        "`pipeline/gone.py` `pipeline/{a,c}.py` `pipeline/*.md`\n"
        "```bash\npython pipeline/also_gone.py  # [not a link](nowhere.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#nothing: no heading #nothing in docs/other.md",
                                  "img/none.png: no such file"]
    assert missing_paths(page) == ["pipeline/*.md", "pipeline/also_gone.py", "pipeline/c.py",
                                   "pipeline/gone.py"]
