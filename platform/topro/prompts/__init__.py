"""Prompts as data, in one place with one placeholder syntax (``placeholders.py``): ToPro templates and
verbalizers per task (``<task>.yaml``), the LLM prompt formats (``llm_formats/*.yaml``), and the
decomposition of a sentence into one prompt per word (Ray-free)."""
from topro.prompts.registry import (Template, Verbalizer, get_template, get_verbalizer,
                                    list_templates, list_verbalizers)
from topro.prompts.decompose import render_question, topro_questions

__all__ = ["Template", "Verbalizer", "get_template", "get_verbalizer", "list_templates",
           "list_verbalizers", "render_question", "topro_questions"]
