"""Peak memory of seq2seq ToPro scoring, measured in a fresh process (run by
tests/test_seq2seq_memory.py): a random T5 with mT5's 250,112-token vocabulary
(tiny d_model, so the logits dominate), one evaluation batch of N prompts x 17
labels. Prints the peak RSS growth in MiB during scoring (Linux VmHWM, reset just before), and the label
log-probabilities' checksum."""
import sys
from pathlib import Path

import torch


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main(tokenizer_dir: str, n_prompts: int) -> None:
    from transformers import MT5Config, MT5ForConditionalGeneration

    from topro.data import get_task, load_split
    from topro.methods import MethodSpec, build_method
    from topro.models import load_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = get_task("udpos")
    spec = MethodSpec(method="topro", task="udpos", labels=list(task.labels), base_model="mt5",
                      template=task.default_template, verbalizer=task.default_verbalizer, max_length=64)
    tok = load_tokenizer(tokenizer_dir)
    method = build_method(spec, tokenizer_dir, tok)
    config = MT5Config(vocab_size=250_112, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                       num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = MT5ForConditionalGeneration(config).eval()
    sentences = load_split("udpos", "en", "dev", limit=20)
    examples = method.encode(sentences)[:n_prompts]
    batch = method.collate(examples)
    with torch.no_grad():
        method.label_log_probs(model, method.collate(examples[:1]))  # warm-up: lazy allocations
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
        lp = method.label_log_probs(model, batch)
        after = _status_kib("VmHWM")
    print(f"peak_mib={(after - before) / 1024:.1f} prompts={len(examples)} labels={lp.shape[1]} "
          f"targets={max(len(t) for t in method.targets)} argmax={lp.argmax(1).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
