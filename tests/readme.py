"""The README's shell blocks, as users copy them: commands per section, comments and prompts stripped."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The text of the README section whose heading is ``title`` (any level), up to the next heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, flags=re.M | re.S)
    if match is None:
        raise LookupError(f"README has no section {title!r}")
    return match.group(1)


def commands(title: str) -> list[str]:
    """The commands of the first ``bash`` block of a section, one per line, without trailing comments."""
    block = re.search(r"```bash\n(.*?)```", section(title), flags=re.S)
    if block is None:
        raise LookupError(f"README section {title!r} has no bash block")
    lines = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)  # drops a trailing comment, keeps quoted text intact
        if words:
            lines.append(shlex.join(words))
    return lines


def blip2_lines() -> list[list[str]]:
    """Every ``blip2`` command line in the README's bash blocks, as argument lists after ``blip2``
    (launcher prefixes such as ``deepspeed ... $(which blip2)`` and ``torchrun ...`` removed)."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
            for start, word in enumerate(words):
                if word in ("blip2", "blip2)"):  # "blip2)": the end of a launcher's $(which blip2)
                    found.append(_without_redirections(words[start + 1:]))
                    break
    return found


def _without_redirections(words: list[str]) -> list[str]:
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in (">", ">>", "2>", "|"):
            skip = True
        else:
            out.append(word)
    return out
