"""mkdocs hook: inline a benchmark's Markdown report into a page.

A line ``<!-- include-results assets/<name>/<file>.md -->`` (path relative to docs/) is replaced by
that file without its first-level title, every other heading one level deeper, and its relative
image links rebased onto its folder. A missing file is a build error: the page must not describe
tables that are not there.
"""
import re
from pathlib import Path

_MARK = re.compile(r"^<!-- include-results (\S+) -->$", re.M)
_IMAGE = re.compile(r"(!\[[^\]]*\]\()(?![a-z]+:|/)([^)]+\))")


def _inline(docs_dir: Path, rel: str) -> str:
    path = docs_dir / rel
    if not path.is_file():
        raise FileNotFoundError(f"include-results: {rel} does not exist under {docs_dir}")
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^# ", line):
            continue
        line = _IMAGE.sub(lambda m: m.group(1) + f"{Path(rel).parent.as_posix()}/" + m.group(2), line)
        lines.append("#" + line if re.match(r"^#{2,5} ", line) else line)
    return "\n".join(lines).strip() + "\n"


def on_page_markdown(markdown: str, page, config, **kwargs) -> str:
    docs_dir = Path(config["docs_dir"])
    return _MARK.sub(lambda m: _inline(docs_dir, m.group(1)), markdown)
