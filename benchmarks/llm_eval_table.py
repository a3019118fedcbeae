"""Markdown tables from `topro eval-llm` result files: one row per language,
one column group per run (headline metric, format-failure rate).

  python benchmarks/llm_eval_table.py outputs/llm/gemma/udpos-*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def label(record: dict) -> str:
    p = record.get("params", {})
    return f"{p.get('format', '?')} {p.get('mode', '?')} {p.get('shots', '?')}-shot"


def table(records: list[dict]) -> str:
    metric = records[0]["metric"]
    langs = sorted({lang for r in records for lang in r["languages"]})
    head = "| lang | " + " | ".join(f"{label(r)}: {metric} | fail" for r in records) + " |"
    rows = [head, "|---|" + "---|---|" * len(records)]
    for lang in langs:
        cells = []
        for r in records:
            x = r["languages"].get(lang)
            cells.append("– | –" if x is None else f"{100 * x[metric]:.1f} | {100 * x['format_failure_rate']:.1f}%")
        rows.append(f"| {lang} | " + " | ".join(cells) + " |")
    avg = " | ".join(f"{100 * r['average'][metric]:.1f} | {100 * r['average'].get('format_failure_rate', 0):.1f}%"
                     for r in records)
    rows.append(f"| **mean** | {avg} |")
    sizes = ", ".join(f"{lang} {records[0]['languages'][lang]['n_sentences']}/"
                      f"{records[0]['languages'][lang]['n_words']}" for lang in langs
                      if lang in records[0]["languages"])
    rows.append(f"\nsentences/words per language: {sizes}")
    return "\n".join(rows)


def main() -> None:
    records = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    for task, rs in by_task.items():
        print(f"### {task} ({rs[0]['model']}, metric {rs[0]['metric']} x100, fail = format-failure rate)\n")
        print(table(rs))
        print()


if __name__ == "__main__":
    main()
