"""MLflow: one experiment per corpus, one parent run per ablation row, one child per fold.

The `ablate` stage logs every row from the results folder `evaluate` (or `baseline`)
wrote (`log_results`), so MLflow is imported once per pipeline run, not once per row.

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

from mdser.runtime import main_repo_root
from mdser.statistics import confusion_counts
from mdser.stores import tree_hash

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


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{k}": json.dumps(v) if isinstance(v, list) else str(v) for k, v in d.items()}


def log_results(experiment: str, corpus: str, results: Path, rows: list[str]) -> dict[str, str]:
    """Log each row's results folder (`results/<row>/`, as `evaluate` or `baseline` wrote it)
    as a parent run with one child run per fold, in the order of `rows`; returns row -> run id.

    A row is logged once per content and DVC experiment: when the experiment already holds
    a finished parent run of the row tagged with the same `mdser.results_hash` (a hash of
    the whole folder) and `dvc.exp_name`, that run's id is returned and nothing is logged,
    so rerunning `ablate` after one row changed logs that row only. The folder's
    `run.json` gives the run's parameters, the fold parameters logged beside each fold
    number, the environment that produced it, its stage and inputs hash, and the names of
    extra files logged as artifacts of the parent run.
    """
    c = client()
    run_ids = {}
    with store_lock():
        exp = experiment_id(c, experiment)
        for row in rows:
            folder = results / row
            record = json.loads((folder / "run.json").read_text())
            tags = run_tags(record["stage"], record["inputs_hash"]) | {
                k: str(v) for k, v in record["environment"].items()} | {
                "mdser.results_hash": tree_hash(folder)}
            logged = c.search_runs([exp], " and ".join([
                f"tags.row = '{row}'", "attributes.status = 'FINISHED'",
                f"tags.`mdser.results_hash` = '{tags['mdser.results_hash']}'",
                f"tags.`dvc.exp_name` = '{tags['dvc.exp_name']}'"]), max_results=1)
            if logged:
                run_ids[row] = logged[0].info.run_id
                continue
            summary = json.loads((folder / "summary.json").read_text())
            folds = [f["fold"] for f in summary["folds"]]
            per_fold = {name: _per_fold(folder / f"{name}.csv", folds, index)
                        for name, index in (("history", "epoch"), ("range_test", "step"))}
            run_ids[row] = log_row(
                c, exp, corpus, row, record["params"], summary, per_fold["history"],
                pd.read_csv(folder / "predictions.csv"), tags,
                texts={name: (folder / name).read_text() for name in record.get("artifacts", [])},
                fold_params={int(k): v for k, v in record["fold_params"].items()},
                range_tests=per_fold["range_test"])
    return run_ids


def _per_fold(path: Path, folds: list[int], index: str) -> dict[int, pd.DataFrame]:
    """A results CSV with the columns `fold` and `index`, split by fold (empty when absent)."""
    frame = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["fold", index])
    return {k: frame[frame["fold"] == k].drop(columns="fold") for k in folds}


def log_row(
    c: Any, exp: str, corpus: str, row: str, run_params: dict[str, Any], summary: dict[str, Any],
    histories: dict[int, pd.DataFrame], predictions: pd.DataFrame, tags: dict[str, str],
    texts: dict[str, str], fold_params: dict[int, dict[str, str]],
    range_tests: dict[int, pd.DataFrame],
) -> str:
    """Log one evaluated ablation row to experiment `exp` through client `c` (under the
    store lock): a parent run and a child run per fold; returns the parent's id.

    The parent holds the summary metrics, the `ua_ci_low`/`ua_ci_high` interval when
    the summary has one, summary.json and the `texts` (artifact name -> content); the row's
    confusion image comes later, from `log_ablation`. Each child holds its curves
    (`histories[fold]`: an `epoch` column, may be empty), test metrics, predictions,
    confusion counts (confusion.json) and `fold_params[fold]` beside its fold number, and
    the learning-rate range test's curve (`range_tests[fold]`: a `step` column, empty with
    fixed bounds) as `range_test_<column>` metrics over its steps.
    """
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    code = {name: i for i, name in enumerate(summary["classes"])}
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
    for name, text in sorted(texts.items()):
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
        curves += [
            Metric(f"range_test_{name}", float(value), now, int(step))
            for step, values in range_tests[k].set_index("step").iterrows()
            for name, value in values.items()
        ]
        final = [Metric(f"test_{m}", float(f[m]), now, 0) for m in ("ua", "wa", "macro_f1")]
        c.log_batch(cid, metrics=curves + final,
                    params=[Param("fold", str(k))] + [Param(n, v) for n, v in sorted(fold_params[k].items())],
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


def log_ablation(
    run_ids: dict[str, str], steps: dict[str, dict[str, Any]], figures: dict[str, Any],
) -> None:
    """Log what `ablate` computed to each row's parent run (`run_ids`, from `log_results`):
    its confusion image (`figures[row]`, over all folds, as confusion.png) and its
    ablation step's paired comparison.

    `steps`: row -> `mdser.ablation.step_comparisons` entry (base, n, delta, ci_low,
    ci_high, p, p_min, significant). A step gives the run the metrics `step_delta_ua`,
    `step_ci_low`, `step_ci_high` (absent below 2 folds), `step_p`, `step_p_min`,
    `step_folds` and the tags `step_base` (the row it modifies) and `step_significant`.
    """
    from mlflow.entities import Metric, RunTag

    c = client()
    now = int(time.time() * 1000)
    with store_lock():
        for row, run_id in sorted(run_ids.items()):
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
