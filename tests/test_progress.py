"""Per-language progress lines of `topro evaluate` and `topro eval-llm` (pure: a fake clock)."""
import io

from topro.progress import LanguageProgress, format_duration


def test_progress_line_counts_languages_rate_and_eta():
    now = [100.0]
    out = io.StringIO()
    progress = LanguageProgress(4, "evaluate", stream=out, clock=lambda: now[0])
    now[0] = 110.0
    assert progress.done("de", 50) == "evaluate: de done (1/4 languages, 5.0 sentences/s, ETA 30s)"
    now[0] = 120.0
    progress.done("fr", 150)  # 200 sentences in 20 s; 2 left at 10 s each
    now[0] = 250.0
    progress.done("ru", 0, ": on node n1")
    now[0] = 260.0
    last = progress.done("tr", 40)
    assert out.getvalue().splitlines() == [
        "evaluate: de done (1/4 languages, 5.0 sentences/s, ETA 30s)",
        "evaluate: fr done (2/4 languages, 10.0 sentences/s, ETA 20s)",
        "evaluate: ru done (3/4 languages, 1.3 sentences/s, ETA 50s): on node n1",
        "evaluate: tr done (4/4 languages, 1.5 sentences/s, 2m40s)"]
    assert last.endswith("2m40s)")


def test_disabled_progress_counts_without_printing_and_durations_read_as_time():
    out = io.StringIO()
    progress = LanguageProgress(2, "eval-llm", enabled=False, stream=out)
    progress.done("de", 10)
    assert out.getvalue() == "" and progress.languages == 1 and progress.sentences == 10
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3661)] == ["0s", "59s", "1m01s", "59m59s", "1h01m"]
