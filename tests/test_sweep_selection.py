"""The sweep's selection policy without Ray or MLflow: which trials are evaluated, which are champions."""
import subprocess
import sys

from topro.sweep_config import load_sweep_config, trial_train_config
from topro.sweep_selection import TrialOutcome, champions, select_trials, setting_label, short_value

GRID = """name: s
base: {task: udpos}
search_space:
  method: {grid: [topro, vanilla]}
  learning_rate: {grid: [1e-3, 1e-4]}
  seed: {grid: [1, 2]}
"""


def _sweep_config(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_sweep_config(path)


def _outcome(cfg, params, dev_score, checkpoint="/ckpt", record=None):
    trial_id = "".join(str(v) for v in params.values())
    outcome = TrialOutcome(trial_id, params, trial_train_config(cfg, params), "TERMINATED", dev_score, checkpoint)
    outcome.record = record
    return outcome


def test_learning_rate_is_chosen_on_mean_english_dev_per_setting(tmp_path):
    cfg = _sweep_config(tmp_path, GRID)
    dev = {("topro", 1e-3): (0.9, 0.5), ("topro", 1e-4): (0.8, 0.7),  # mean 0.70 vs 0.75: 1e-4 wins
           ("vanilla", 1e-3): (0.6, 0.6), ("vanilla", 1e-4): (0.5, 0.55)}
    outcomes = [TrialOutcome(f"{m}{lr}{seed}", {"method": m, "learning_rate": lr, "seed": seed},
                             trial_train_config(cfg, {"method": m, "learning_rate": lr, "seed": seed}), "TERMINATED",
                             scores[seed - 1], "/ckpt")
                for (m, lr), scores in dev.items() for seed in (1, 2)]
    chosen = {(o.params["method"], o.params["learning_rate"], o.params["seed"]) for o in select_trials(cfg, outcomes)}
    assert chosen == {("topro", 1e-4, 1), ("topro", 1e-4, 2), ("vanilla", 1e-3, 1), ("vanilla", 1e-3, 2)}
    assert setting_label(cfg, outcomes[0].params) == "topro"


def test_trials_without_checkpoint_or_score_are_never_chosen(tmp_path):
    cfg = _sweep_config(tmp_path, GRID)
    best_but_no_checkpoint = _outcome(cfg, {"method": "topro", "learning_rate": 1e-3, "seed": 1}, 0.99, checkpoint=None)
    no_score = _outcome(cfg, {"method": "topro", "learning_rate": 1e-3, "seed": 2}, None)
    usable = _outcome(cfg, {"method": "topro", "learning_rate": 1e-4, "seed": 1}, 0.1)
    assert select_trials(cfg, [best_but_no_checkpoint, no_score, usable]) == [usable]
    cfg.evaluate = "all"
    assert select_trials(cfg, [best_but_no_checkpoint, no_score, usable]) == [usable]


def test_evaluate_all_keeps_every_learning_rate(tmp_path):
    cfg = _sweep_config(tmp_path, GRID + "evaluate: all\n")
    outcomes = [_outcome(cfg, {"method": "topro", "learning_rate": lr, "seed": 1}, score)
                for lr, score in ((1e-3, 0.9), (1e-4, 0.1))]
    assert select_trials(cfg, outcomes) == outcomes


def test_setting_label_names_the_other_compared_fields(tmp_path):
    cfg = _sweep_config(tmp_path, """name: s
base: {task: udpos, method: topro}
search_space:
  template: {grid: [topro, topro_is]}
  learning_rate: {grid: [1e-3, 1e-4]}
  seed: {grid: [1, 2]}
""")
    # the method comes from the base; the selected learning rate and the seed are not named
    assert setting_label(cfg, {"template": "topro_is", "learning_rate": 1e-3, "seed": 1}) == "topro (template=topro_is)"
    assert short_value(0.0001) == "0.0001" and short_value(2e-5) == "2e-05" and short_value("a/b/c") == "c"


def test_champion_per_task_and_method_is_the_best_evaluated_on_english_dev(tmp_path):
    cfg = _sweep_config(tmp_path, GRID)
    record = {"languages": {}}
    first = _outcome(cfg, {"method": "topro", "learning_rate": 1e-3, "seed": 1}, 0.7, record=record)
    tie = _outcome(cfg, {"method": "topro", "learning_rate": 1e-3, "seed": 2}, 0.7, record=record)
    not_evaluated = _outcome(cfg, {"method": "topro", "learning_rate": 1e-4, "seed": 1}, 0.99)
    vanilla = _outcome(cfg, {"method": "vanilla", "learning_rate": 1e-4, "seed": 1}, 0.2, record=record)
    best = champions([vanilla, first, tie, not_evaluated])
    assert list(best) == [("udpos", "topro"), ("udpos", "vanilla")]
    assert best[("udpos", "topro")] is first and best[("udpos", "vanilla")] is vanilla


def test_selection_imports_neither_ray_nor_mlflow():
    code = ("import sys, topro.sweep_selection; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
