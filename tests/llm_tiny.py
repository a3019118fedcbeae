"""Tiny random language models built offline for the LLM tests.

Real architectures (Llama, Gemma 3 with sliding-window layers, T5) at toy size,
with real tokenizers trained here on a few hundred XTREME sentences: a BPE for
the causal LMs (small vocabulary, so label words split into several tokens)
and a sentencepiece unigram model for T5.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("TOPRO_DATA_DIR", "/work/shared/data/xtreme"))

# Words the prompt templates use, so the tiny tokenizers know them.
TEMPLATE_TEXT = (
    "Part-of-speech tag: Named entity type: Sentence: Tags: of the word in the sentence is "
    "The pos tag named entity is a kind of: Answer with word/TAG pairs "
    "modification position verbal auxiliar link determine mode thing number functional "
    "reference name punct condition symbol verb other location organisation person place body "
    "ADJ ADP ADV AUX CCONJ DET INTJ NOUN NUM PART PRON PROPN PUNCT SCONJ SYM VERB X "
    "B-LOC B-ORG B-PER I-LOC I-ORG I-PER O"
)


def read_sentences(path: Path, limit: int) -> list[list[tuple[str, str]]]:
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
                if len(sentences) >= limit:
                    break
            continue
        word, tag = line.split("\t")[:2]
        current.append((word, tag))
    if current and len(sentences) < limit:
        sentences.append(current)
    return sentences


def corpus_lines(n: int = 300) -> list[str]:
    lines = [TEMPLATE_TEXT] * 5
    for task, lang in [("udpos", "en"), ("udpos", "de"), ("panx", "en"), ("panx", "de")]:
        for sentence in read_sentences(DATA_DIR / task / f"train-{lang}.tsv" if lang == "en"
                                       else DATA_DIR / task / f"dev-{lang}.tsv", n // 4):
            lines.append(" ".join(w for w, _ in sentence))
    return lines


def build_bpe_tokenizer(out: Path, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    # Sentencepiece-like: a space becomes part of the next token; no dummy prefix,
    # so " thing" tokenized alone starts with "▁thing" as it would mid-text.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=list("\n/:-"), limit_alphabet=200)
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_bpe_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_tiny_gemma3(out: Path, sliding_window: int = 8) -> Path:
    """Gemma 3 with a tiny sliding window, so prompts cross it and the windowed
    masks of the shared-prefix path are exercised; logit soft-capping on."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = build_bpe_tokenizer(out)
    torch.manual_seed(1)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=4096, initializer_range=0.2, final_logit_softcapping=30.0,
        query_pre_attn_scalar=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    Gemma3ForCausalLM(config).save_pretrained(out)
    return out


def build_tiny_bloom(out: Path) -> Path:
    """BLOOM: ALiBi position biases built from the 2-D padding mask (no position ids, no 4-D masks)."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    tok = build_bpe_tokenizer(out)
    torch.manual_seed(3)
    config = BloomConfig(vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    BloomForCausalLM(config).save_pretrained(out)
    return out


def build_tiny_t5(out: Path) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = out / "corpus.txt"
    text.write_text("\n".join(corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "spiece"), vocab_size=400, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        user_defined_symbols=["/"], minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
    vocab = [(processor.id_to_piece(i), processor.get_score(i))
             for i in range(processor.get_piece_size())]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, legacy=False)
    tok.save_pretrained(out)
    torch.manual_seed(2)
    config = T5Config(vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=2,
                      num_decoder_layers=2, num_heads=4, initializer_factor=3.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(out)
    return out


# --- cached builders, shared by the test modules -----------------------------

import functools
import tempfile

_ROOT = Path(tempfile.mkdtemp(prefix="topro-llm-tiny-"))


@functools.lru_cache(maxsize=None)
def tiny_model_dir(kind: str) -> Path:
    """Folder of a tiny model ("llama", "gemma3", "bloom" or "t5"), built once per process."""
    builders = {"llama": build_tiny_llama, "gemma3": build_tiny_gemma3, "bloom": build_tiny_bloom,
                "t5": build_tiny_t5}
    return builders[kind](_ROOT / kind)


@functools.lru_cache(maxsize=None)
def tiny_model(kind: str, dtype=None):
    """(model, tokenizer) loaded for scoring: eval mode, sdpa attention, float64 by default.

    Float64 because the tests compare two orders of summation (shared-prefix vs
    naive scoring): summed label log-probs of the random models are ~-150 to
    -190, where float32 results differed by up to 6.9e-4 on some CPUs (another
    kernel, another order), while float64 agrees to ~1e-10 on any CPU and
    thread count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(1)
    path = tiny_model_dir(kind)
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    model = cls.from_pretrained(path, attn_implementation="sdpa", dtype=dtype or torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(path)
