import pytest

from topro.data import DataFormatError, available_languages, get_task, load_split, read_conll, read_conllu, read_xtreme_tsv


def test_real_udpos_english_train_counts(data_dir):
    sentences = load_split("udpos", "en", "train", data_dir)
    assert len(sentences) == 21253
    assert sum(len(s) for s in sentences) == 375194
    assert all(len(s.words) == len(s.tags) for s in sentences)
    assert set(t for s in sentences for t in s.tags) <= set(get_task("udpos").labels)


def test_panx_languages_and_limit(data_dir):
    langs = available_languages("panx", "dev", data_dir)
    assert "en" in langs and "zh" not in langs  # PAN-X zh ships no dev split
    assert len(load_split("panx", "de", "dev", data_dir, limit=7)) == 7


def test_last_sentence_without_trailing_blank_line(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("a\tNOUN\nb\tVERB\n\nc\tDET\nd\tNOUN")
    sentences = read_xtreme_tsv(path, labels=get_task("udpos").labels)
    assert [s.words for s in sentences] == [["a", "b"], ["c", "d"]]
    assert sentences[1].source.endswith("x.tsv:4")


def test_line_without_tab_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("a\tNOUN\nb VERB\n")
    with pytest.raises(DataFormatError, match=r"bad.tsv:2: .*no tab"):
        read_xtreme_tsv(path)


def test_unknown_tag_shows_allowed_set(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("a\tNOUN\n\nb\tNOPE\n")
    with pytest.raises(DataFormatError, match=r"bad.tsv:3: unknown tag 'NOPE'.*allowed tags: \['ADJ'"):
        read_xtreme_tsv(path, labels=get_task("udpos").labels)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        read_xtreme_tsv(path)


def test_missing_split_lists_available_languages(data_dir):
    with pytest.raises(DataFormatError, match=r"no dev split for language 'zh'.*languages with a dev split"):
        load_split("panx", "zh", "dev", data_dir)


def test_conllu_skips_multiword_and_empty_nodes(tmp_path):
    path = tmp_path / "x.conllu"
    rows = ["# text = Vámonos al mar", "1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_",
            "1\tVamos\tir\tVERB\t_\t_\t0\troot\t_\t_", "2\tnos\tnosotros\tPRON\t_\t_\t1\tobj\t_\t_",
            "2.1\tX\t_\tNOUN\t_\t_\t_\t_\t_\t_", "3\tal\ta\tADP\t_\t_\t1\tcase\t_\t_"]
    path.write_text("\n".join(rows) + "\n")
    [sentence] = read_conllu(path, labels=get_task("udpos").labels)
    assert sentence.words == ["Vamos", "nos", "al"] and sentence.tags == ["VERB", "PRON", "ADP"]


def test_two_column_conll(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- O\n\nBerlin B-LOC\nis O\n\nbad line here\n")
    with pytest.raises(DataFormatError, match=r"x.conll:6"):
        read_conll(path)
    path.write_text("-DOCSTART- O\n\nBerlin B-LOC\nis O\n")
    [sentence] = read_conll(path, labels=get_task("panx").labels)
    assert sentence.tags == ["B-LOC", "O"]


def test_invalid_utf8_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("Das\tDET\nist\tAUX\n\nMädchen\tNOUN\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1.tsv:4: not valid UTF-8 \(byte 0xe4 at column 2\)"):
        read_xtreme_tsv(path)


def test_utf8_bom_is_not_kept_in_the_first_word(tmp_path):
    for name, text, read in [("bom.tsv", "Das\tDET\nist\tAUX\n", read_xtreme_tsv),
                             ("bom.conllu", "1\tDas\tder\tDET\t_\t_\t0\troot\t_\t_\n", read_conllu),
                             ("bom.conll", "Berlin B-LOC\n", read_conll)]:
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert read(path)[0].words[0] in ("Das", "Berlin"), name


def test_conllu_errors_name_the_line_after_multiword_and_empty_node_lines(tmp_path):
    path = tmp_path / "x.conllu"
    rows = ["# text = Vámonos al mar", "1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_",
            "1\tVamos\tir\tVERB\t_\t_\t0\troot\t_\t_", "2\tnos\tnosotros\tPRON\t_\t_\t1\tobj\t_\t_",
            "2.1\tX\t_\tNOUN\t_\t_\t_\t_\t_\t_", "3\tal\ta\tBADTAG\t_\t_\t1\tcase\t_\t_"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataFormatError, match=r"x.conllu:6: unknown tag 'BADTAG' for word 'al'"):
        read_conllu(path, labels=get_task("udpos").labels)
    [sentence] = read_conllu(path)
    assert sentence.source.endswith("x.conllu:3")  # its first word, not the comment


def test_registry_lists_every_xtreme_language_including_test_only_ones():
    udpos, panx = get_task("udpos"), get_task("panx")
    xtreme_udpos = "af ar bg de el en es et eu fa fi fr he hi hu id it ja kk ko mr nl pt ru ta te th tl tr ur vi yo zh"
    xtreme_panx = ("af ar bg bn de el en es et eu fa fi fr he hi hu id it ja jv ka kk ko ml mr ms my nl pt ru sw "
                   "ta te th tl tr ur vi yo zh")
    assert set(xtreme_udpos.split()) <= set(udpos.languages)
    assert set(xtreme_panx.split()) <= set(panx.languages)
    assert {"th", "tl", "yo"} <= set(udpos.test_only) <= set(udpos.languages)
    assert udpos.final_split == "test" and panx.final_split == "dev"


def test_missing_split_offline_names_the_file_and_the_layout(data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataFormatError) as err:
        load_split("udpos", "th", "test", data_dir)
    text = str(err.value)
    assert str(data_dir / "udpos" / "test-th.tsv") in text and "only a test split" in text
    assert "<split>-<lang>.tsv" in text and "offline" in text


def test_missing_split_loads_through_datasets_where_a_source_is_reachable(tmp_path, monkeypatch, data_dir):
    """A dataset folder laid out as the hub's (configs in README metadata) stands in for the hub."""
    import json

    from topro.data import tasks

    hub = tmp_path / "hub"
    (hub / "th").mkdir(parents=True)
    rows = [{"tokens": ["a", "b"], "pos_tags": ["NOUN", "VERB"]}, {"tokens": ["c"], "pos_tags": ["PUNCT"]}]
    (hub / "th" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: udpos.Thai\n  data_files:\n"
                                   "  - split: test\n    path: th/test.jsonl\n---\n")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    text = (tasks.BUILTIN_TASKS / "udpos.yaml").read_text().replace("path: google/xtreme", f"path: {hub}")
    (task_dir / "udpos.yaml").write_text(text)
    monkeypatch.setenv("TOPRO_TASKS_PATH", str(task_dir))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    tasks._registry.cache_clear()
    try:
        sentences = load_split("udpos", "th", "test", data_dir)  # not in data_dir: taken from the source
    finally:
        monkeypatch.delenv("TOPRO_TASKS_PATH")
        tasks._registry.cache_clear()
    assert [s.words for s in sentences] == [["a", "b"], ["c"]]
    assert sentences[0].tags == ["NOUN", "VERB"] and sentences[0].lang == "th"


def test_hidden_test_labels_are_refused_not_scored(tmp_path):
    from topro.evaluate import check_gold_labels

    (tmp_path / "panx").mkdir()
    (tmp_path / "panx" / "test-de.tsv").write_text("Angela\tO\nMerkel\tO\n\nin\tO\nBerlin\tO\n")
    (tmp_path / "panx" / "dev-de.tsv").write_text("Angela\tB-PER\nMerkel\tI-PER\n\nin\tO\nBerlin\tO\n")
    sentences = load_split("panx", "de", "test", tmp_path)
    with pytest.raises(DataFormatError, match=r"test-de.tsv: every gold label .* is 'O' .*hidden"):
        check_gold_labels("panx", "de", "test", str(tmp_path), sentences)
    all_o_prefix = load_split("panx", "de", "dev", tmp_path)[1:]  # no entity in what is scored, but the file has some
    check_gold_labels("panx", "de", "dev", str(tmp_path), all_o_prefix)


def test_default_split_is_test_for_udpos_where_it_is_at_hand(tmp_path, data_dir, monkeypatch):
    from topro.data.loading import default_split

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_split("panx", str(data_dir)) == "dev"
    assert default_split("udpos", str(data_dir)) == "dev"  # no test files here and no hub: dev, logged
    (tmp_path / "udpos").mkdir()
    (tmp_path / "udpos" / "test-th.tsv").write_text("a\tNOUN\n")
    assert default_split("udpos", str(tmp_path)) == "test"
