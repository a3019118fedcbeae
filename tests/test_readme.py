"""The README's own commands: every `topro` / `python` line of its bash blocks parses with the real
parsers, names configs, scripts and fields that exist, and passes the pre-checks it would meet (data,
languages, names, values), so a command shown cannot fail on a typo or a renamed flag. No Ray, no model."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from topro.cli import build_parser
from topro.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# Placeholders the README uses where the reader supplies a value.
PLACEHOLDERS = ("PATH", "CKPT", "CHECKPOINT", "URL", "$REGISTRY", "/path/to/", "ray://head", "registry.example")


def bash_commands() -> list[str]:
    """Logical lines of the README's ```bash blocks (continuations joined, comments dropped)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing "  # comment"
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def _argv(command: str) -> list[str]:
    words = shlex.split(command.replace("$PWD", str(REPO)))
    while words and re.match(r"^[A-Z_]+=", words[0]):  # leading VAR=value assignments
        words.pop(0)
    if words and words[0].startswith(".venv/bin/"):
        words[0] = words[0][len(".venv/bin/"):]
    return words


def topro_commands() -> list[list[str]]:
    """`topro ...`, `python -m topro.cli ...` and `python jobs/*.py ...` lines, as `topro` argv lists."""
    out = []
    for command in bash_commands():
        words = _argv(command)
        if words[:1] == ["topro"]:
            out.append(words[1:])
        elif words[:3] == ["python", "-m", "topro.cli"]:
            out.append(words[3:])
        elif words[:2] == ["python", "jobs/sweep.py"]:
            out.append(["sweep", *words[2:]])
        elif words[:2] == ["python", "jobs/train.py"]:
            out.append(["train", *words[2:]])
    return out


def test_the_readme_shows_the_commands_a_newcomer_needs():
    commands = bash_commands()
    assert "source .venv/bin/activate" in commands
    subcommands = {argv[0] for argv in topro_commands()}
    assert {"train", "evaluate", "sweep", "report", "serve", "eval-llm"} <= subcommands
    bounded = [argv for argv in topro_commands() if argv[0] in ("eval-llm", "evaluate")]
    assert bounded and all("--max-sentences" in argv for argv in bounded), \
        "every evaluation example is bounded (PAN-X dev has 10,000 sentences per language)"


def test_every_script_and_file_a_command_names_exists():
    for command in bash_commands():
        words = _argv(command)
        if not words:
            continue
        if words[0] in ("python", "bash") and len(words) > 1 and not words[1].startswith("-"):
            script = words[1]
            if script.startswith("../shared/"):
                continue  # beside the repository, not in it
            assert (REPO / script).is_file(), f"README: {command!r}: no {script}"
        if words[:2] == ["serve", "run"]:
            assert (REPO / words[2]).is_file(), f"README: {command!r}: no {words[2]}"
        if words[0] not in ("topro", "python"):
            continue
        for i, word in enumerate(words):
            if word == "--config" and i + 1 < len(words) and not words[i + 1].startswith("$"):
                target = words[i + 1]
                if any(p in target for p in PLACEHOLDERS):
                    continue
                assert (REPO / target).is_file(), f"README: {command!r}: no {target}"


@pytest.mark.parametrize("argv", topro_commands(), ids=lambda a: " ".join(a)[:70])
def test_every_topro_command_parses_and_passes_its_prechecks(argv, tmp_path):
    """Flags exist (the real parser), overrides name real fields with usable values, and the data,
    languages and names each command needs are there (what the command itself checks first)."""
    args = build_parser().parse_args(argv)
    if any(p in " ".join(argv) for p in PLACEHOLDERS):
        return  # a value the reader supplies (a model path, a URL)
    if args.command == "train":
        cfg = load_config(TrainConfig, REPO / args.config, args.overrides, output_dir=str(tmp_path / "run"))
        if cfg.model != "tiny" and not Path(cfg.model).expanduser().is_dir():
            return  # a pretrained model folder built by ../shared/tools/offline_models.py
        from topro.precheck import check_train

        check_train(cfg)
    elif args.command == "sweep":
        from topro.precheck import check_sweep
        from topro.sweep_config import load_sweep_config

        sweep = load_sweep_config(REPO / args.config, args.overrides, data_dir=args.data_dir)
        if sweep.base["model"] == "tiny":
            check_sweep(sweep)
    elif args.command == "eval-llm":
        from topro.cli.eval_llm import config_from_args

        cfg = config_from_args(args)
        assert cfg.max_sentences, "the LLM example runs on a bounded budget"
        if Path(cfg.model).expanduser().is_dir():
            from topro.precheck import check_llm

            check_llm(task=cfg.task, model=cfg.model, format=cfg.format, langs=cfg.langs,
                      split=cfg.split, data_dir=cfg.data_dir, verbalizer=cfg.verbalizer,
                      shots=cfg.shots, max_sentences=cfg.max_sentences)
