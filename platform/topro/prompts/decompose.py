"""Token-level prompt decomposition: a sentence of n words becomes n questions."""
from __future__ import annotations

from topro.prompts.placeholders import fill
from topro.prompts.registry import Template


def render_question(template: Template, word: str, mask: str) -> str:
    return fill(template.question, word=word, mask=mask)


def topro_questions(template: Template, words: list[str], mask: str) -> list[str]:
    """One question per word; the sentence itself is the pair's other segment."""
    return [render_question(template, word, mask) for word in words]
