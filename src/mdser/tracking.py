"""MLflow: one experiment per corpus, one parent run per ablation row, one child per fold.

The store defaults to an SQLite database in the repository's `mlruns/`, addressed
by an absolute URI so that `dvc exp run --queue` (which runs in a temporary copy
of the repository under `.dvc/tmp/exps/`) logs to the same place. Set
`MLFLOW_TRACKING_URI` to use a shared server instead. Writes to the local store
are serialised by a file lock, so concurrent queue workers never lose a run to
"database is locked".
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from mdser.runtime import cpu_flags, cpu_model, main_repo_root
from mdser.statistics import confusion_counts

SUMMARY_METRICS = [
    "ua_mean", "ua_std", "wa_mean", "wa_std", "macro_f1_mean",
    "pooled_ua", "pooled_wa", "pooled_macro_f1", "n_folds",
]
CI_METRICS = ["ua_ci_low", "ua_ci_high"]  # absent (not logged) with fewer than 2 folds


def local_store(root: Path | None = None) -> Path:
    return main_repo_root(root) / "mlruns"


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_store(root) / 'mlflow.db'}"


@contextmanager
def store_lock(root: Path | None = None) -> Iterator[None]:
    """Serialise writers of the local SQLite store (a no-op lock for a server)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    store = local_store(root)
    store.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store / ".lock"), timeout=600):
        yield


def client(root: Path | None = None) -> Any:
    """An MlflowClient on the tracking URI; creates the local database if needed.

    `mlflow.set_tracking_uri` is not called: it would write MLFLOW_TRACKING_URI into
    the environment, which here means "a shared server". MLflow's "View run at
    <url>" lines are switched off, since a server URL may carry credentials.
    """
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    with store_lock(root):
        return MlflowClient(tracking_uri(root))


def experiment_id(mlflow_client: Any, name: str, root: Path | None = None) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (local_store(root) / "artifacts" / name).as_uri()
    from mlflow.exceptions import MlflowException

    try:  # "custom_model_development" makes the UI open on the runs table, not the GenAI overview
        return mlflow_client.create_experiment(
            name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
        )
    except MlflowException:
        # Another worker (a DVC queue worker logging to the same server) created it first:
        # a shared server has no store lock, and its unique name constraint decides.
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_tags(stage: str, inputs_hash: str) -> dict[str, str]:
    """Tags tying a run to DVC: experiment name, stage, inputs hash and git commit."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    return {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.stage": stage, "dvc.inputs_hash": inputs_hash, "git.commit": commit,
    }


def environment_tags(stage: str, inputs_hash: str, trained: dict[str, Any]) -> dict[str, str]:
    """`run_tags` plus the hardware and TensorFlow that trained the row, as its `fold.json`
    records them (`trained`: one fold's record), so evaluating imports no TensorFlow."""
    return run_tags(stage, inputs_hash) | {
        k: str(trained[k]) for k in ("device", "cpu_flags", "tensorflow")}


def baseline_tags(stage: str, inputs_hash: str) -> dict[str, str]:
    """`run_tags` plus the CPU and scikit-learn that ran the baseline (no TensorFlow import)."""
    import sklearn


    return run_tags(stage, inputs_hash) | {
        "device": f"CPU {cpu_model()} ({os.cpu_count()} cores)", "cpu_flags": cpu_flags(),
        "sklearn": sklearn.__version__,
    }


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{k}": json.dumps(v) if isinstance(v, list) else str(v) for k, v in d.items()}


def log_row(
    corpus: str, row: str, run_params: dict[str, Any], summary: dict[str, Any],
    histories: dict[int, pd.DataFrame], predictions: pd.DataFrame,
    tags: dict[str, str], experiment: str, texts: dict[str, str] | None = None,
    fold_params: dict[int, dict[str, str]] | None = None,
    range_tests: dict[int, pd.DataFrame] | None = None,
) -> str:
    """Log one evaluated ablation row: a parent run and a child run per fold.

    The parent holds the summary metrics, the `ua_ci_low`/`ua_ci_high` interval when
    the summary has one, summary.json and any `texts` (artifact name -> content); the row's
    confusion image comes later, from `log_ablation` (drawing it here would cost every
    `evaluate` stage a second). Each child holds its curves (`histories[fold]`, may be
    empty), test metrics, predictions, confusion counts (confusion.json) and
    `fold_params[fold]` beside its fold number, and
    the learning-rate range test's curve (`range_tests[fold]`, empty with fixed bounds)
    as `range_test_<column>` metrics over its steps.
    """
    from mlflow.entities import Metric, Param, RunTag

    c = client()
    now = int(time.time() * 1000)
    code = {name: i for i, name in enumerate(summary["classes"])}
    with store_lock():
        exp = experiment_id(c, experiment)
        close_dangling_runs(c, exp, row)
        parent = c.create_run(exp, run_name=row, tags=tags | {"row": row, "corpus": corpus, "level": "row"})
        pid = parent.info.run_id
        metrics = {k: summary[k] for k in SUMMARY_METRICS if k != "n_folds"}
        metrics |= {"n_folds": len(summary["folds"])}
        metrics |= {f"recall_{k}": v for k, v in summary["recall"].items()}
        metrics |= {k: summary[k] for k in CI_METRICS if summary.get(k) is not None}
        params = {k: v for section, d in run_params.items() for k, v in _flat(section, d).items()}
        c.log_batch(
            pid, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())],
            params=[Param(k, v) for k, v in sorted(params.items())],
        )
        c.log_text(pid, json.dumps(summary, indent=2, sort_keys=True), "summary.json")
        for name, text in sorted((texts or {}).items()):
            c.log_text(pid, text, name)
        for f in summary["folds"]:
            k = f["fold"]
            child_tags = tags | {
                "row": row, "corpus": corpus, "level": "fold", "fold": str(k),
                "test_speaker": f["test_speaker"], "mlflow.parentRunId": pid,
            }
            child = c.create_run(exp, run_name=f"{row}/fold{k}", tags=child_tags)
            cid = child.info.run_id
            curves = [
                Metric(name, float(value), now, int(epoch))
                for epoch, values in histories[k].set_index("epoch").iterrows()
                for name, value in values.items()
            ]
            sweep = (range_tests or {}).get(k, pd.DataFrame(columns=["step"]))
            curves += [
                Metric(f"range_test_{name}", float(value), now, int(step))
                for step, values in sweep.set_index("step").iterrows()
                for name, value in values.items()
            ]
            final = [Metric(f"test_{m}", float(f[m]), now, 0) for m in ("ua", "wa", "macro_f1")]
            extra = (fold_params or {}).get(k, {})
            c.log_batch(cid, metrics=curves + final,
                        params=[Param("fold", str(k))] + [Param(n, v) for n, v in sorted(extra.items())],
                        tags=[RunTag("test_speaker", f["test_speaker"])])
            fold_predictions = predictions[predictions["fold"] == k]
            c.log_text(cid, fold_predictions.to_csv(index=False), "predictions.csv")
            c.log_dict(cid, {"classes": summary["classes"], "actual_by_predicted": confusion_counts(
                fold_predictions["actual"].map(code), fold_predictions["predicted"].map(code),
                len(code)).tolist()}, "confusion.json")
            c.set_terminated(cid)
        c.set_terminated(pid)
    return pid


def close_dangling_runs(mlflow_client: Any, exp: str, row: str) -> None:
    """Mark runs of `row` left RUNNING by a killed stage as KILLED (local store only:
    under its lock no live writer can be mid-run; a shared server may have one)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    for run in mlflow_client.search_runs(
        [exp], f"tags.row = '{row}' and attributes.status = 'RUNNING'", max_results=5000
    ):
        mlflow_client.set_terminated(run.info.run_id, status="KILLED")


def log_failure(corpus: str, row: str, fold: int, message: str, experiment: str) -> None:
    """Record a training that stopped (e.g. a NaN loss) as a FAILED run."""
    c = client()
    with store_lock():
        exp = experiment_id(c, experiment)
        run = c.create_run(exp, run_name=f"{row}/fold{fold}", tags={
            "row": row, "corpus": corpus, "level": "fold", "fold": str(fold), "error": message[:4000],
        })
        c.set_terminated(run.info.run_id, status="FAILED")


def latest_parent_runs(mlflow_client: Any, experiment: str, rows: list[str]) -> dict[str, list[Any]]:
    """Every finished parent run of each of `rows`, newest first."""
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = mlflow_client.search_runs(
        [exp.experiment_id], "tags.level = 'row' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=5000,
    )
    out: dict[str, list[Any]] = {}
    for run in runs:
        row = run.data.tags.get("row")
        if row in rows:
            out.setdefault(row, []).append(run)
    return out


def fold_results(mlflow_client: Any, parent: Any) -> list[dict[str, Any]]:
    """The per-fold test results of a parent run, from its child runs, in fold order."""
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=5000,
    )
    folds = [
        {"fold": int(r.data.tags["fold"]), "test_speaker": r.data.tags.get("test_speaker", ""),
         "ua": r.data.metrics["test_ua"], "wa": r.data.metrics["test_wa"],
         "macro_f1": r.data.metrics["test_macro_f1"]}
        for r in children if r.info.status == "FINISHED" and "test_ua" in r.data.metrics
    ]
    return sorted(folds, key=lambda f: f["fold"])


def summaries_from_mlflow(experiment: str, rows: list[str]) -> dict[str, dict[str, Any]]:
    """The latest finished parent run of each row: its summary metrics and, from its
    fold runs, the per-fold results (`folds`, for the intervals and paired tests)."""
    c = client()
    out: dict[str, dict[str, Any]] = {}
    for row, runs in latest_parent_runs(c, experiment, rows).items():
        run = runs[0]
        out[row] = {k: run.data.metrics[k] for k in SUMMARY_METRICS} | {"folds": fold_results(c, run)}
    return out


def _same_results(run: Any, summary: dict[str, Any]) -> bool:
    """Whether a parent run logged exactly this summary (the float metrics are stored exactly)."""
    m = run.data.metrics
    return all(m.get(k) == summary[k] for k in ("ua_mean", "ua_std", "wa_mean", "pooled_ua")) and (
        m.get("n_folds") == len(summary["folds"])
    )


def log_ablation(
    experiment: str, summaries: dict[str, dict[str, Any]], steps: dict[str, dict[str, Any]],
    figures: dict[str, Any],
) -> list[str]:
    """Log what `ablate` computed to each row's parent run: its confusion image
    (`figures[row]`, over all folds, as confusion.png) and its ablation step's paired comparison.

    `steps`: row -> `mdser.ablation.step_comparisons` entry (base, n, delta, ci_low,
    ci_high, p, p_min, significant). The run is the newest finished parent run of
    the row whose summary metrics equal `summaries[row]` (the results the table was
    built from, not a later run of another experiment); a step gives it the metrics
    `step_delta_ua`, `step_ci_low`, `step_ci_high` (absent below 2 folds), `step_p`,
    `step_p_min`, `step_folds` and the tags `step_base` (the row it modifies) and
    `step_significant`. Returns the rows of `summaries` that had no such run (nothing
    logged for them).
    """
    from mlflow.entities import Metric, RunTag

    c = client()
    now = int(time.time() * 1000)
    missing = []
    with store_lock():
        runs = latest_parent_runs(c, experiment, sorted(summaries))
        for row, summary in sorted(summaries.items()):
            match = [r for r in runs.get(row, []) if _same_results(r, summary)]
            if not match:
                missing.append(row)
                continue
            run_id = match[0].info.run_id
            if row in figures:
                c.log_figure(run_id, figures[row], "confusion.png")
            if row not in steps:
                continue
            step = steps[row]
            values = {
                "step_delta_ua": step["delta"], "step_ci_low": step["ci_low"],
                "step_ci_high": step["ci_high"], "step_p": step["p"], "step_p_min": step["p_min"],
                "step_folds": step["n"],
            }
            significant = step["significant"]
            c.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in sorted(values.items()) if v is not None],
                tags=[RunTag("step_base", step["base"]),
                      RunTag("step_significant", "-" if significant is None else str(significant).lower())],
            )
    return missing
