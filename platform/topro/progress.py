"""Per-language progress of a long evaluation, one line per finished language (Ray-free).

    evaluate: de done (3/10 languages, 41.2 sentences/s, ETA 2m05s)

The rate is over all sentences so far; the ETA is the languages left times the mean time per language so
far (languages differ in size, so it is a guide, and it settles as languages finish). Lines go to stderr,
so a command's table on stdout stays clean.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LanguageProgress:
    """Counts finished languages of ``total`` and prints a line for each (``enabled=False``: counts only)."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream, self.clock = stream, clock
        self.started = clock()
        self.languages = self.sentences = 0

    def done(self, lang: str, n_sentences: int, detail: str = "") -> str:
        """Record language ``lang`` (``n_sentences`` scored); the line, printed when enabled."""
        self.languages += 1
        self.sentences += n_sentences
        elapsed = max(self.clock() - self.started, 1e-9)
        left = self.total - self.languages
        eta = f", ETA {format_duration(elapsed / self.languages * left)}" if left else f", {format_duration(elapsed)}"
        line = (f"{self.label}: {lang} done ({self.languages}/{self.total} languages, "
                f"{self.sentences / elapsed:.1f} sentences/s{eta}){detail}")
        if self.enabled:
            print(line, file=self.stream or sys.stderr, flush=True)
        return line
