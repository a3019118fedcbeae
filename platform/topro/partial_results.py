"""Per-language results files that a stop does not lose, and that a rerun resumes (Ray-free, torch-free).

``topro evaluate`` and ``topro eval-llm`` write their results file after every language, marked
``partial: true`` with ``languages_not_evaluated`` until the last one, so SIGTERM, SIGKILL or a lost node
costs at most the languages under way. The same command run again keeps the languages such a file holds
and evaluates only the others, provided the file was written by that command with the same
``resume_settings`` (everything a kept score depends on); a partial file of other settings is refused
rather than mixed into one record.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from topro.config import ConfigError


def unfinished(languages: list[str], results: dict[str, Any]) -> dict[str, Any]:
    """``partial`` and ``languages_not_evaluated`` for a record that misses languages (a stopped evaluation)."""
    missing = [lang for lang in languages if lang not in results]
    return {"partial": True, "languages_not_evaluated": missing} if missing else {}


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a results file with every language it was asked for (not a stopped run's)."""
    try:
        return not json.loads(Path(path).read_text(encoding="utf-8")).get("partial")
    except (OSError, ValueError, AttributeError):
        return False


def comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from the JSON file (tuples become lists, keys strings)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def kept_languages(output: str | Path, *, writer: str, settings: dict[str, Any], overwrite: bool = False,
                   predictions_file: bool = False) -> dict[str, dict[str, Any]]:
    """The per-language results that a stopped run of ``writer`` with these ``settings`` left at ``output``.

    ``{}`` where ``output`` is absent, unreadable, complete, or written by something else. A partial file of
    ``writer`` with other settings raises ``ConfigError`` naming the settings that differ, or with
    ``overwrite`` gives ``{}`` (start over); one of the same settings is resumed even with ``overwrite``, since
    evaluating its languages again would give the same scores (so "rerun the same command" always resumes). With
    ``predictions_file`` the per-sentence predictions stored beside it (``X.predictions.json``) go back
    into each kept language; a language without them is evaluated again."""
    path = Path(output)
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(previous, dict) or previous.get("written_by") != writer or not previous.get("partial"):
        return {}
    before, now = previous.get("resume_settings") or {}, comparable(settings)
    differ = [key for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if differ and overwrite:
        return {}
    if differ:
        shown = "; ".join(f"{key}: {before.get(key)!r} there, {now.get(key)!r} now" for key in differ[:6])
        raise ConfigError(f"--output {path}: holds a stopped `{writer}` run with other settings ({shown}); "
                          f"rerun with its settings to resume it, or choose another --output, or pass "
                          f"--overwrite to start over")
    languages = previous.get("languages") or {}
    if predictions_file:
        stored = path.with_name(previous.get("predictions_file") or "")
        try:
            predictions = json.loads(stored.read_text(encoding="utf-8"))["languages"] \
                if previous.get("predictions_file") else {}
        except (OSError, ValueError, KeyError, TypeError):
            predictions = {}
        languages = {lang: {**result, "predictions": predictions[lang]}
                     for lang, result in languages.items() if lang in predictions}
    return languages
