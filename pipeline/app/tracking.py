"""`tracking:` record each run in an experiment tracker, MLflow: the config, every head's metrics, the
figures, the report and the saved heads.

By default the store is local, in the run's folder: `output_dir/mlflow/mlflow.db` (SQLite, the backend
MLflow 3 maintains; its file store is in maintenance mode and refuses to start without an opt-out) with
the artifacts beside it in `output_dir/mlflow/artifacts`; `mlflow ui --backend-store-uri
sqlite:///.../mlflow.db` shows it. A `uri` names another store or a tracking server instead.

MLflow is an optional dependency (`pip install "transfer-pipeline[tracking]"`): it is imported only
when a run has a tracking: section, so a run without one starts and behaves exactly as before.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.schema import Section, option

logger = logging.getLogger(__name__)

FOLDER = "mlflow"  # in output_dir: the local store
ARTIFACTS = ("metrics.json", "report.html", "predictions.csv", "skipped.csv", "*.png")


class TrackingSection(Section):
    """`tracking:` where a run is recorded (`tracking: mlflow` is this with its defaults)."""

    backend: Literal["mlflow"] = option(accepts="mlflow", about="the tracker (MLflow, the optional `tracking` extra)")
    uri: str | None = option(
        None, accepts="an MLflow tracking URI (sqlite:///FILE, http://HOST:PORT, ...)",
        about="the store (default: a SQLite store in output_dir/mlflow, artifacts beside it)")
    experiment: str = option("pipeline", accepts="an experiment name", about="the MLflow experiment of the run")


def tracking_shorthand(value: Any) -> Any:
    """`tracking: mlflow` is `tracking: {backend: mlflow}`."""
    return {"backend": value} if isinstance(value, str) else value


class TrackingError(PipelineError):
    """The tracker is not installed, or refused what was logged."""


MISSING = ("'tracking': mlflow is not installed: pip install \"transfer-pipeline[tracking]\" (or mlflow-skinny), "
           "or remove the tracking: section")


def installed() -> bool:
    """Whether MLflow can be imported (checked without importing it)."""
    return importlib.util.find_spec("mlflow") is not None


def _flat(prefix: str, value: Any) -> dict[str, str]:
    """Nested config values as MLflow params: dotted keys, text values."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}" if prefix else key,
                                                                        item).items()}
    return {prefix: str(value)}


def _head_metrics(metrics: dict) -> dict[str, float]:
    """Every number of metrics.json's heads, as `<head>.<metric>` (calibration and reject flattened)."""
    found: dict[str, float] = {}
    for name, scores in metrics["heads"].items():
        for key, value in _flat(name, {k: v for k, v in scores.items() if k not in ("best_params", "sources", "type")}
                                ).items():
            try:
                found[key] = float(value)
            except ValueError:  # a method's name, or None
                continue
    return found


def track_run(section: TrackingSection, out: Path, config: dict, metrics: dict) -> str:
    """Log a finished run (its `config` as parsed, `metrics` as in metrics.json, and the files of `out`)
    as one MLflow run named after the output folder; returns the MLflow run id."""
    from mlflow.tracking import MlflowClient

    store = out / FOLDER
    uri = section.uri or f"sqlite:///{(store / 'mlflow.db').absolute()}"
    try:
        if section.uri is None:
            store.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(section.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            section.experiment, artifact_location=None if section.uri else (store / "artifacts").absolute().as_uri())
        run = client.create_run(experiment_id, run_name=out.name, tags={"best_head": metrics["best_head"]})
        run_id = run.info.run_id
        params = _flat("", {k: v for k, v in config.items() if k != "heads"})
        params.update({f"heads.{h['name']}.{k}": str(v) for h in config.get("heads") or [] for k, v in h.items()
                       if k != "name"})
        for key, value in sorted(params.items()):
            client.log_param(run_id, key, value[:6000])
        for key, value in _head_metrics(metrics).items():
            client.log_metric(run_id, key, value)
        client.log_dict(run_id, config, "config.json")
        for pattern in ARTIFACTS:
            for path in sorted(out.glob(pattern)):
                client.log_artifact(run_id, str(path))
        client.log_artifacts(run_id, str(out / "heads"), "heads")
        client.set_terminated(run_id)
    except Exception as exc:  # the tracker's own errors (a server down, a store it cannot open)
        raise TrackingError(f"tracking: MLflow at {uri} refused the run ({type(exc).__name__}: "
                            f"{first_line(exc)}); the run's results are in {out}") from None
    logger.info(f"tracking: MLflow run {run_id} in experiment {section.experiment!r} at {uri}")
    return run_id
