"""Label words with a real XLM-R-style SentencePiece tokenizer whose label
words are ordinary vocabulary (not user-defined symbols)."""
import pytest

from topro.config import TrainConfig
from topro.methods.base import MethodSpec, label_token_ids


@pytest.fixture(scope="module")
def xlmr_tokenizer(tmp_path_factory, data_dir):
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    from topro.data import load_split

    folder = tmp_path_factory.mktemp("xlmr-tok")
    lines = [" ".join(s.words) for lang in ("en", "de") for s in
             load_split("udpos", lang, "train" if lang == "en" else "dev", data_dir, limit=300)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"),
                                   vocab_size=1500, model_type="unigram", character_coverage=1.0, bos_id=-1,
                                   eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2)
    # Real XLM-R vocabularies hold a lone "▁" (for words whose start is no piece);
    # a vocabulary this small has none, so it gets one, as an ordinary piece.
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString((folder / "sp.model").read_bytes())
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = "▁", min(p.score for p in proto.pieces) - 1.0, 1
    (folder / "sentencepiece.bpe.model").write_bytes(proto.SerializeToString())
    return XLMRobertaTokenizer.from_pretrained(folder)


def test_a_lone_word_start_plus_a_piece_is_two_tokens(xlmr_tokenizer):
    tok = xlmr_tokenizer
    vocab = tok.get_vocab()

    def pieces(word):
        return tok.convert_ids_to_tokens(tok(" " + word, add_special_tokens=False).input_ids)

    # An ordinary vocabulary piece that only exists inside words: " w" -> ["▁", "w"].
    inner = next(p for p in sorted(vocab) if p.isalpha() and len(p) >= 3 and "▁" + p not in vocab
                 and pieces(p) == ["▁", p])
    whole = next(p[1:] for p in sorted(vocab) if p.startswith("▁") and p[1:].isalpha() and len(p) > 4
                 and pieces(p[1:]) == [p])
    assert len(label_token_ids(tok, [whole], "strict")) == 1
    with pytest.raises(ValueError, match=rf"label word '{inner}' is 2 tokens"):
        label_token_ids(tok, [whole, inner], "strict")
    # first_subword scores the piece itself (not the shared "▁").
    assert label_token_ids(tok, [whole, inner], "first_subword")[1] == vocab[inner]


def test_label_words_must_be_single_tokens_by_default():
    assert TrainConfig(task="udpos").label_word_policy == "strict"
    assert MethodSpec(method="topro", task="udpos", labels=["X"], base_model="tiny").label_word_policy == "strict"
