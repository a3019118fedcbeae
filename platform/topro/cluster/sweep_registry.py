"""The sweep's registration: each task and method's champion checkpoint in the MLflow model registry, under an alias.

Which trial is the champion is ``topro.sweep_selection.champions`` (best English dev among the evaluated
trials); here its checkpoint is logged to its run (once), registered as a version of
``topro-<task>-<method>`` and given the sweep's ``register_alias`` (``@champion`` by default). A resumed
sweep finds the version it registered before and only moves the alias.
"""
from __future__ import annotations

import logging
from typing import Any

from topro import tracking
from topro.cluster.sweep_faults import kill_driver_if_asked
from topro.sweep_config import SweepConfig
from topro.sweep_selection import TrialOutcome, champions

log = logging.getLogger(__name__)


def register_champions(sweep: SweepConfig, trials: list[TrialOutcome]) -> list[dict[str, Any]]:
    """Register the best evaluated checkpoint per task and method (chosen on English dev, not on the test languages)."""
    if not sweep.register_alias:
        return []
    registered = []
    for (task, method), t in champions(trials).items():
        name = tracking.registered_name(task, method)
        version = tracking.registered_version_of_run(name, t.run_id)
        if version is None:
            tracking.log_checkpoint(t.run_id, t.checkpoint)
            version = tracking.register_checkpoint(t.run_id, name, alias=sweep.register_alias,
                                                   description=f"best {task} {method} checkpoint of sweep {sweep.name} "
                                                               f"on English dev")
        else:
            tracking.mlflow_client().set_registered_model_alias(name, sweep.register_alias, version)
        tracking.mlflow_client().set_tag(t.run_id, "topro.registered", f"{name}/{version}@{sweep.register_alias}")
        log.info("registered %s version %s as @%s (trial %s, English dev %.4f)", name, version, sweep.register_alias,
                 t.trial_id, t.dev_score)
        kill_driver_if_asked("registered")
        registered.append({"name": name, "version": version, "alias": sweep.register_alias, "run_id": t.run_id,
                           "trial_id": t.trial_id, "dev_score": t.dev_score,
                           "uri": f"models:/{name}@{sweep.register_alias}"})
    return registered
