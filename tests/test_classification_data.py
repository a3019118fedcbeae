"""Sentence-level classification, data layer: the text<TAB>label reader and the PAN-X-derived task."""
from pathlib import Path

import pytest

from topro.config import ConfigError, TrainConfig, from_dict
from topro.data import get_task, load_split
from topro.data.classification import derive_panx_entity_types, load_texts, read_text_tsv, single_type
from topro.data.readers import DataFormatError


@pytest.mark.parametrize("content,needle", [
    ("Paris is nice\tLOC\nno tab here\n", ":2: expected 'text<TAB>label'"),
    ("Paris\tLOC\n \tPER\n", ":2: empty text"),
    ("Paris\tLOC\n\nAcme\tMISC\n", ":3: unknown label 'MISC'; allowed labels: ['LOC', 'ORG', 'PER']"),
    ("\n\n", "no examples"),
])
def test_reader_names_file_and_line(tmp_path, content, needle):
    path = tmp_path / "dev-xx.tsv"
    path.write_text(content)
    with pytest.raises(DataFormatError) as err:
        read_text_tsv(path, labels=["PER", "ORG", "LOC"])
    assert str(err.value).startswith(str(path)) and needle in str(err.value)


def test_single_type():
    assert single_type(["B-LOC", "I-LOC", "O", "B-LOC"]) == "LOC"
    assert single_type(["B-LOC", "O", "B-PER"]) is None
    assert single_type(["O", "O"]) is None


def test_derived_task_from_real_panx(tmp_path, data_dir):
    counts = derive_panx_entity_types(data_dir, tmp_path, splits=("dev",), langs=["de", "ja", "el"])
    assert set(counts) == {"dev-de", "dev-el"}  # no PAN-X dev-ja here: skipped
    examples = load_texts("panx_type", "de", "dev", tmp_path)
    assert len(examples) == sum(counts["dev-de"].values()) and min(counts["dev-de"].values()) > 0
    # each example is a PAN-X sentence with entities of that one type
    sentences = [s for s in load_split("panx", "de", "dev", data_dir) if single_type(s.tags)]
    assert [e.text for e in examples] == [" ".join(s.words) for s in sentences]
    assert [e.label for e in examples] == [single_type(s.tags) for s in sentences]
    assert examples[0].source.endswith("dev-de.tsv:1")


def test_classification_tasks_are_a_kind_of_task():
    assert get_task("panx_type").kind == "classification" and get_task("panx").kind == "tagging"
    from topro.precheck import check_names

    check_names(from_dict(TrainConfig, {"task": "panx_type"}))  # trains now (tests/test_classification.py)
    with pytest.raises(ConfigError, match="method 'prompt_tuning' has no classification form"):
        check_names(from_dict(TrainConfig, {"task": "panx_type", "method": "prompt_tuning"}))
