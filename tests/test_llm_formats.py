"""Prompt formats as data, demonstrations, and the tolerant answer parser."""
from dataclasses import dataclass

import pytest
import yaml

from topro.prompts.formats import (FormatError, list_formats, load_format, render_context,
                               render_pair, render_sentence_prompt, render_topro, select_demos)
from topro.llm.parse import label_lookup, match_label, parse_tagged_answer

UPOS = "ADJ ADP ADV AUX CCONJ DET INTJ NOUN NUM PART PRON PROPN PUNCT SCONJ SYM VERB X".split()
PANX_WORDS = {"O": "other", "B-PER": "person", "I-PER": "name", "B-ORG": "organisation", "I-ORG": "body",
              "B-LOC": "location", "I-LOC": "place"}  # the task's label order


@dataclass
class S:
    words: list
    tags: list


def test_registry_lists_every_shipped_file():
    names = list_formats()
    assert {"topro", "topro-nolist", "topro-tags", "topro-cloze", "sentence"} <= set(names)
    for name in names:
        fmt = load_format(name)
        assert fmt.name == name
        assert {"udpos", "panx"} <= set(fmt.tasks)


def test_paper_template_renders_exactly():
    fmt = load_format("topro")
    context = render_context(fmt, "panx", PANX_WORDS, [])
    prompts = render_topro(fmt, "panx", PANX_WORDS, context, ["Anton", "lives", "."])
    text = prompts.context + prompts.sentence + prompts.questions[0] + prompts.answers["B-PER"]
    assert text == ("Named entity type: location organisation person place body name other\n"
                    "Sentence: Anton lives .\n"
                    "Named entity type of the word Anton in the sentence is person")


def test_demos_are_seeded_and_label_diverse():
    train = [S(["w%d" % i, "x", "y", "z"], ["B-PER", "O", "O", "O"]) for i in range(50)]
    a = select_demos(train, 3, seed=7, style="topro")
    assert a == select_demos(train, 3, seed=7, style="topro")
    assert a != select_demos(train, 3, seed=8, style="topro")
    labels = [d.tags[d.word_index] for d in a]
    assert labels.count("B-PER") == 1 and labels.count("O") == 2
    fmt = load_format("sentence")
    context = render_context(fmt, "panx", {t: t for t in PANX_WORDS}, select_demos(train, 2, 1, "sentence"))
    assert context.count("Tags:") == 2 and "/B-PER" in context
    assert render_sentence_prompt(fmt, "panx", ["a", "b"]) == "Sentence: a b\nTags:"
    assert render_pair(fmt, "panx", "Berlin") == (" Berlin/", "{label}")


def test_bad_format_files_name_file_and_field(tmp_path):
    good = yaml.safe_load(open(load_format("topro").path))
    bad = dict(good, tasks={"udpos": dict(good["tasks"]["udpos"], question="{wrod}")})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(FormatError, match=r"bad.yaml: tasks.udpos.question: placeholder.*wrod"):
        load_format(path)
    path.write_text(yaml.safe_dump(dict(good, style="cloze")))
    with pytest.raises(FormatError, match="style"):
        load_format(path)
    with pytest.raises(FormatError, match="unknown prompt format"):
        load_format("nope")
    with pytest.raises(FormatError, match="no templates for task 'ner'"):
        load_format("topro").for_task("ner")


def test_parser_is_tolerant_and_counts_failures():
    lookup = label_lookup({t: t for t in PANX_WORDS})
    words = ["Anton", "Wilhelm", "lebt", "in", "Köln", "."]
    text = "  Anton/B-PER Wilhelm/i-per lebt/O in_O Koeln/B-LOC ./O\nSentence: next"
    parsed = parse_tagged_answer(text, words, lookup, fallback="O")
    assert parsed.tags == ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]  # respelled Köln aligned by position
    assert parsed.n_failed == 0
    parsed = parse_tagged_answer("Anton/B-PER lebt/O in/LOCATION Köln/B-LOC", words, lookup, "O")
    assert parsed.failed == [False, True, False, True, False, True]
    assert parsed.reasons == {"invalid_tag": 1, "missing": 2}
    parsed = parse_tagged_answer("I cannot help with that.", words, lookup, "O")
    assert parsed.n_failed == 6 and parsed.reasons == {"no_pairs": 6}
    assert parse_tagged_answer("and/or/O", ["and/or"], lookup, "X").tags == ["O"]


def test_match_label():
    lookup = label_lookup(PANX_WORDS)
    assert match_label(" person\nSentence:", lookup) == "B-PER"
    assert match_label(" Organisation.", lookup) == "B-ORG"
    assert match_label("b-loc", lookup) == "B-LOC"
    assert match_label(" persona non grata", lookup) == "B-PER"
    assert match_label(" banana", lookup) is None
    assert match_label("\n", lookup) is None


def test_whole_sentence_answers_parse_and_align_word_by_word():
    """Hand-written model answers for "Der Hund sieht der Katze nach ." (the
    repeated "der" included): well-formed, shifted, partial, repeated pairs,
    and pairs about other words, asserted word by word."""
    lookup = label_lookup({t: t for t in UPOS})
    words = ["Der", "Hund", "sieht", "der", "Katze", "nach", "."]
    gold = ["DET", "NOUN", "VERB", "DET", "NOUN", "ADP", "PUNCT"]

    def parse(text):
        p = parse_tagged_answer(text, words, lookup, fallback="X")
        return p.tags, p.failed

    well = "Der/DET Hund/NOUN sieht/VERB der/DET Katze/NOUN nach/ADP ./PUNCT"
    assert parse(well) == (gold, [False] * 7)
    # Shifted by an extra leading pair (the model tagged "Tags" too): still aligned by word.
    assert parse("Tags/NOUN " + well) == (gold, [False] * 7)
    # Shifted by a missing first word: that word fails, the others keep their own tags.
    assert parse(well.split(" ", 1)[1]) == (["X"] + gold[1:], [True] + [False] * 6)
    # Partial: the answer stops after three words.
    assert parse("Der/DET Hund/NOUN sieht/VERB") == (gold[:3] + ["X"] * 4, [False] * 3 + [True] * 4)
    # A pair repeated: the second copy is ignored, the repeated sentence word "der" still gets its own.
    assert parse("Der/DET Hund/NOUN Hund/NOUN sieht/VERB der/DET Katze/NOUN nach/ADP ./PUNCT") == (gold, [False] * 7)
    # Respelled words keep their tags by position ...
    assert parse("Der/DET Hund/NOUN siet/VERB der/DET Katse/NOUN nach/ADP ./PUNCT") == (gold, [False] * 7)
    # ... but pairs about other words (a sentence the model made up, same length) are failures, not tags.
    made_up = "The/DET dog/NOUN looks/VERB after/ADP the/DET cat/NOUN !/PUNCT"
    assert parse(made_up) == (["X"] * 7, [True] * 7)


def test_one_placeholder_syntax_fills_in_one_pass_for_templates_and_formats():
    from topro.prompts import get_template, render_question
    from topro.prompts.placeholders import fill, placeholders

    assert placeholders("The {word} is {mask} {0} {{x}}") == {"word", "mask", "x"}
    assert fill("a {word} b {mask} {other}", word="{mask}", mask="<m>") == "a {mask} b <m> {other}"
    template = get_template("udpos", "topro")
    assert render_question(template, "{mask}", "<m>") == fill(template.question, word="{mask}", mask="<m>")
    assert "{mask}" in render_question(template, "{mask}", "<m>")  # a word is never read as a placeholder
    fmt = load_format("topro")
    assert fmt.path.endswith("prompts/llm_formats/topro.yaml")
