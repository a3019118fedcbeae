"""The one placeholder syntax of every prompt text: ToPro templates (``{word}``, ``{mask}``) and LLM
formats (``{sentence}``, ``{word}``, ``{label}``, ``{label_list}``).

A placeholder is ``{name}``; it is filled in one pass, so a filled-in value is never read again (a word
that holds ``{mask}`` stays that word). Any other brace is plain text: nothing needs escaping.
"""
from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(text: str) -> set[str]:
    """The placeholder names ``text`` uses."""
    return set(PLACEHOLDER.findall(text))


def fill(text: str, **values: str) -> str:
    """``text`` with each placeholder named in ``values`` replaced by its value (others are left as they are)."""
    return PLACEHOLDER.sub(lambda m: str(values[m[1]]) if m[1] in values else m[0], text)
