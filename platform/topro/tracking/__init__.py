"""MLflow and nothing else (no Ray here): runs, the model registry, and what metrics are called.

``runs``: the tracking URI, a sweep's parent and trial runs, their params, metrics and evaluations.
``registry``: registering checkpoints under aliases, and resolving ``models:/`` and ``runs:/`` URIs to
local folders. ``metric_names``: the names metrics and params are logged under. ``llm_runs``: one LLM
evaluation as a run (imported by ``topro eval-llm --track`` itself). Everything public is
re-exported here, so callers write ``from topro import tracking`` and ``tracking.<name>``.
"""
from topro.tracking.metric_names import (TRAINING_METRIC_KEYS, TRAINING_METRIC_PREFIXES, evaluation_metrics,
                                         flat_params, is_finite_number, is_number, training_metrics)
from topro.tracking.registry import (CHECKPOINT_ARTIFACT, describe_model_uri, is_registry_uri, log_checkpoint,
                                     register_checkpoint, registered_name, registered_version_of_run,
                                     resolve_checkpoint)
from topro.tracking.runs import (DEFAULT_TRACKING_URI, EVALUATED_TAG, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND,
                                 MODEL_TRAINING_QUERY, ui_link, HTTP_REQUEST_DEFAULTS, KIND_TAG, PARENT_TAG,
                                 PREDICTIONS_FILE, SWEEP_TAG, TRIAL_TAG, child_runs, configure, end_run,
                                 experiment_id, find_sweep_run, load_evaluation, load_predictions, log_evaluation,
                                 log_metrics, log_params, mlflow_client, start_sweep_run, trial_run, tracking_uri)

__all__ = [
    "CHECKPOINT_ARTIFACT", "DEFAULT_TRACKING_URI", "EVALUATED_TAG", "EXPERIMENT_KIND_TAG", "MODEL_TRAINING_KIND",
    "MODEL_TRAINING_QUERY", "ui_link", "HTTP_REQUEST_DEFAULTS", "KIND_TAG",
    "PARENT_TAG", "PREDICTIONS_FILE", "SWEEP_TAG", "TRAINING_METRIC_KEYS", "TRAINING_METRIC_PREFIXES", "TRIAL_TAG",
    "child_runs", "configure", "describe_model_uri", "end_run", "evaluation_metrics", "experiment_id",
    "find_sweep_run", "flat_params", "is_finite_number", "is_number", "is_registry_uri", "load_evaluation",
    "load_predictions", "log_checkpoint", "log_evaluation", "log_metrics", "log_params", "mlflow_client",
    "register_checkpoint", "registered_name", "registered_version_of_run", "resolve_checkpoint",
    "start_sweep_run", "trial_run", "tracking_uri",
]
