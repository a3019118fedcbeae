"""Model and tokenizer resolution, and the built-in offline ``tiny`` model (Ray-free).

``tiny`` is a small BERT-style masked LM (random weights) with a WordPiece
tokenizer trained on the task's *train* splits only (a sample of every
language that has one, plus every verbalizer's label words so each is a
single token): no dev or test text, which zero-shot scores are measured on,
shapes its vocabulary. It is built once into ``$TOPRO_CACHE/tiny-<task>-<key>``
(default ``~/.cache/topro``) and needs no download, so demos and tests run
offline.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from topro.data.loading import available_languages, load_split, resolve_data_dir
from topro.data.tasks import get_task

TINY = "tiny"
TINY_SENTENCES_PER_LANG = 400
TINY_VOCAB = 8000


def cache_dir() -> Path:
    return Path(os.environ.get("TOPRO_CACHE", Path.home() / ".cache" / "topro")).expanduser()


def resolve_model_path(model: str, task: str, data_dir: str | None = None) -> str:
    """A Hugging Face id or folder as given; ``tiny`` is built on first use."""
    if model == TINY:
        return str(build_tiny_model(task, data_dir))
    return model


TINY_CORPUS_SPLITS = ("train",)
"""The only splits the tiny tokenizer reads: evaluation text (dev, test) never enters its vocabulary."""


def _tiny_corpus(task: str, data_dir: str | None) -> list[str]:
    lines = []
    for split in TINY_CORPUS_SPLITS:
        for lang in available_languages(task, split, data_dir):
            for sentence in load_split(task, lang, split, data_dir, limit=TINY_SENTENCES_PER_LANG):
                lines.append(" ".join(sentence.words))
    return lines


def tiny_vocabulary_words(task: str) -> list[str]:
    """The words the ``tiny`` builder adds to its trained vocabulary (sorted): every word of every template
    and every verbalizer of ``task`` (label words and, for verbalizers given lists, every seed word)."""
    from topro.prompts import get_template, get_verbalizer, list_templates, list_verbalizers

    words = {w for v in list_verbalizers(task) for w in get_verbalizer(task, v).all_words()}
    for t in list_templates(task):
        words.update(get_template(task, t).question.replace("{word}", " ").replace("{mask}", " ").split())
    return sorted(words)


def _tiny_wordpieces(tok, corpus: list[str]) -> list[str]:
    """The ``tiny`` tokenizer's WordPiece vocabulary (without specials), the same on every machine.

    Not HF tokenizers' ``WordPieceTrainer``: it breaks ties between equally frequent characters and pairs in
    hash-map order, so no two builds gave the same vocabulary (about 40 tokens of 8,000 differ and half the ids
    move), and tests trained a different tiny model on every machine. sentencepiece's BPE trainer (single
    thread, every sentence, no sampling) is deterministic; its pieces map onto WordPiece's (a word-initial
    ``▁xy`` is ``xy``, an inner ``xy`` is ``##xy``), and every character the corpus has, in the positions it
    has it, is added so no word of the corpus becomes ``[UNK]``. Same BPE merges, so the same token counts as
    the trainer it replaces (1.97 vs 1.96 tokens per word on UDPOS dev)."""
    import io

    import sentencepiece as spm

    # Text as the tokenizer will see it: normalized, split into words (BERT splits punctuation and CJK).
    lines = [" ".join(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)))
             for line in corpus]
    lines = [line for line in lines if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=TINY_VOCAB,
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, split_digits=False, byte_fallback=False,
        normalization_rule_name="identity", bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = []
    for i in range(processor.get_piece_size()):
        piece = processor.id_to_piece(i)
        if processor.is_unknown(i) or len(piece.lstrip("\u2581")) < 2:
            continue  # characters come below, in the positions they occur in
        pieces.append(piece[1:] if piece.startswith("\u2581") else "##" + piece)
    chars = {c for line in lines for word in line.split() for c in [word[0]] + ["##" + x for x in word[1:]]}
    return pieces + sorted(chars)


def tiny_model_dir(task: str, data_dir: str | None, words: list[str]) -> Path:
    """Where the ``tiny`` model of ``task`` is cached: its key covers the data folder and every word the
    builder adds to the vocabulary (``tiny_vocabulary_words``), so a new template or verbalizer word (or a
    verbalizer list) builds a new model instead of reusing one whose vocabulary lacks it."""
    root = resolve_data_dir(data_dir)
    # The real path: a data folder reached through a link is the same data, so the same model (two keys
    # meant two builds, and the tokenizer trainer does not give the same vocabulary twice).
    where = os.path.realpath(root) if root else None
    added = hashlib.sha1("\x1f".join(words).encode()).hexdigest()
    key = hashlib.sha1(f"{task}|{where}|v4-spm-bpe|{added}".encode()).hexdigest()[:8]  # v1 read dev text; v3 HF trainer
    return cache_dir() / f"tiny-{task}-{key}"


def build_tiny_model(task: str, data_dir: str | None = None) -> Path:
    """Build (once) a tiny BERT masked LM whose tokenizer is trained on ``task``'s data.

    One recipe top to bottom (vocabulary words, tokenizer, config, weights, an atomic publish of the
    folder): each step uses the one before, and none is used anywhere else."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders
    from safetensors.torch import save_model
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast
    import torch

    from topro.prompts import get_template, get_verbalizer, list_templates, list_verbalizers

    get_task(task)  # clear error for an unknown task
    words = tiny_vocabulary_words(task)
    target = tiny_model_dir(task, data_dir, words)
    if _complete(target):
        return target
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    vocab = {token: i for i, token in enumerate(specials)}
    for piece in _tiny_wordpieces(tok, _tiny_corpus(task, data_dir)):
        vocab.setdefault(piece, len(vocab))
    # Every label word, seed word and template word must be one token: add the missing ones to the vocabulary.
    for word in words:
        if word not in vocab:
            vocab[word] = len(vocab)
    tok.model = models.WordPiece(vocab=vocab, unk_token="[UNK]")
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=512)
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512, type_vocab_size=2,
                        pad_token_id=vocab["[PAD]"])
    # Fixed weights, without touching the caller's random state: the run's seed
    # must give the same run whether this builds the model or finds it cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".tiny-{task}-"))
    try:
        # Not model.save_pretrained: transformers 5 writes model files on torch.distributed rank 0 only, so
        # a DDP worker of another rank (on another node, or under another cache key) would publish a
        # tokenizer-only folder. The same files, written by every rank:
        model.config.architectures = [type(model).__name__]  # what save_pretrained records
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fast.save_pretrained(tmp)
        if target.exists() and not _complete(target):
            shutil.rmtree(target, ignore_errors=True)  # half a folder published by an older topro
        try:  # atomic publish: concurrent builders (Ray workers) never see half a folder
            os.replace(tmp, target)
        except OSError:
            pass  # another builder published first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


MODEL_KINDS = ("masked", "causal", "seq2seq")


def model_kind(model_path: str) -> str:
    """``masked``, ``causal`` or ``seq2seq``: which LM head the model at ``model_path`` has, from its config
    (the class it was saved as, else what its model type supports). Neither an LM head nor a seq2seq model:
    a ``ValueError`` naming the field ``model``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "masked"
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal"
    # Saved as a bare encoder (multilingual-e5) or a multimodal wrapper: what the type supports. Masked first:
    # BERT and XLM-R also have a (rarely used) causal-LM class.
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ValueError(f"model {model_path!r} (model type {config.model_type!r}) has neither a masked-LM nor a "
                     "causal-LM head, nor is it a seq2seq LM: set model to a masked, causal or seq2seq LM")


MLM_HEAD_PREFIXES = ("cls.predictions.", "lm_head.", "generator_lm_head.", "pred_layer.", "vocab_projector.",
                     "vocab_transform.")
"""Weight-name prefixes of masked-LM heads (BERT, XLM-R/RoBERTa, ELECTRA, XLM, DistilBERT)."""


def mlm_head_untrained(model_path: str) -> bool | None:
    """Whether the pretrained weights at ``model_path`` lack a masked-LM head (ToPro then starts it from
    random weights: multilingual-e5 is published as an encoder only). ``None``: cannot tell (no local
    safetensors)."""
    import glob

    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "model.safetensors")
        except Exception:
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    files = sorted(glob.glob(str(folder / "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    if (folder / "config.json").is_file() and model_kind(str(folder)) == "causal":
        return _causal_head_untrained(folder, files)
    for file in files:
        with safe_open(file, "pt") as f:
            if any(k.startswith(MLM_HEAD_PREFIXES) or f".{MLM_HEAD_PREFIXES[0]}" in k for k in f.keys()):
                return False
    return True


def _causal_head_untrained(folder: Path, files: list[str]) -> bool:
    """A causal LM's output layer is ``lm_head.weight``, or its embedding matrix when tied (gemma-3-270m's
    safetensors has no ``lm_head.*`` key: its head is its embeddings)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    for file in files:
        with safe_open(file, "pt") as f:
            keys = list(f.keys())
        if any(k.endswith("lm_head.weight") for k in keys):
            return False
        if tied and any(k.endswith(("embed_tokens.weight", "word_embeddings.weight", "wte.weight")) for k in keys):
            return False
    return True


def load_tokenizer(path: str):
    """The tokenizer at ``path``; one without a pad token (Llama 3, Qwen base models) pads with its
    end-of-sequence token (logged): attention masks keep padding out of every score."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {path}: its tokenizer has neither a pad nor an end-of-sequence token, so "
                             "batches cannot be padded; give a model whose tokenizer defines one of them")
        tokenizer.pad_token = tokenizer.eos_token
        logging.getLogger(__name__).info("model %s: no pad token; padding with its end-of-sequence token %r",
                                         path, tokenizer.eos_token)
    return tokenizer


def pick_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
