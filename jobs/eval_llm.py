"""``ray job submit -- python jobs/eval_llm.py --task udpos --model ... --langs de,ru``: LLM evaluation.

Same arguments as ``topro eval-llm``; the per-language work runs as Ray tasks. Needs topro installed.
"""
import sys

from topro.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-llm", *sys.argv[1:]]))
