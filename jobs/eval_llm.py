"""`ray job submit -- python jobs/eval_llm.py --task udpos --model ... --langs de,ru`:
LLM evaluation (same arguments as `topro eval-llm`), per-language work as Ray tasks."""
import sys

from topro.llm.cli import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
