"""MLflow logging of one LLM evaluation run (`topro eval-llm --track`).

Params: the run configuration (`LLMEvalConfig` plus the method name and the
demonstrations). Metrics: the task's headline metric, accuracy and the
format-failure rate per language (`f1.de`, `accuracy.de`,
`format_failure_rate.de`) and averaged (`f1.avg`, ...). Artifact: the results
JSON. Tracking URI: argument, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

EXPERIMENT = "topro-llm"
PER_LANGUAGE = ("accuracy", "f1", "precision", "recall", "xtreme_seqeval_f1", "format_failure_rate",
                "sentence_format_failure_rate", "seconds", "model_tokens")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text[:6000]  # MLflow's param value limit


def log_llm_run(record: dict[str, Any], params: dict[str, Any], *, tracking_uri: str | None = None,
                experiment: str = EXPERIMENT, run_name: str | None = None,
                json_path: str | Path | None = None) -> str:
    """One MLflow run for a results record; returns its run id."""
    import mlflow

    from topro.tracking import configure

    from topro.tracking import experiment_id

    configure(tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id(experiment))  # created in the model-training view
    with mlflow.start_run(run_name=run_name or f"{record['task']}-{record['method']}") as run:
        mlflow.set_tags({"task": record["task"], "method": record["method"], "model": record["model"],
                         "kind": "llm-eval"})
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        metrics = {}
        for lang, r in record["languages"].items():
            for key in PER_LANGUAGE:
                if isinstance(r.get(key), (int, float)):
                    metrics[f"{key}.{lang}"] = float(r[key])
            if "viterbi" in r:
                metrics[f"viterbi_f1.{lang}"] = float(r["viterbi"]["f1"])
        for key, value in record.get("average", {}).items():
            if isinstance(value, (int, float)):
                metrics[f"{key}.avg"] = float(value)
        mlflow.log_metrics(metrics)
        if json_path is not None:
            mlflow.log_artifact(str(json_path))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "results.json"
                path.write_text(json.dumps(record, indent=2, ensure_ascii=False))
                mlflow.log_artifact(str(path))
        return run.info.run_id
