"""DVC stage `ablate`: the paper's Table 1 and Table 3 from every row's test results,
with the baseline row, intervals, the paired ablation-step comparisons and the figure.

    python stages/ablate.py results metrics

Reads results/<row>/ for every `ablation.rows` row and results/baseline/; writes
metrics/ablation.{md,csv,json}, metrics/training.md (did the curves flatten),
metrics/ablation_plot.csv, metrics/images/ablation.png, the confusion data and images,
the curves and the learning-rate range tests; logs every row (and the baseline) to MLflow
from its results folder, with its confusion image and its step's comparison.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from mdser.ablation import (
    BASELINE,
    convergence_frame,
    convergence_markdown,
    headline_comparisons,
    headline_frame,
    plot_frame,
    step_comparisons,
    steps_frame,
    table_frame,
    write_figure,
    write_tables,
)
from mdser.errors import UserError, run_stage
from mdser.evaluation import confusion_figure
from mdser.params import load_params, row_model
from mdser.tracking import log_ablation, log_results


def read_row(results: Path, metrics: Path, row: str, stage: str) -> tuple[dict, pd.DataFrame | None, Any]:
    """A row's summary, training history (None: the baseline has none) and confusion
    figure; writes its confusion data and image, its mean curve and its range-test curve."""
    path = results / row / "summary.json"
    if not path.exists():
        raise UserError(f"{path}: missing; run `dvc repro {stage}`")
    summary = json.loads(path.read_text())
    predictions = pd.read_csv(results / row / "predictions.csv")
    for sub in ("confusion", "curves", "images", "range_test"):
        (metrics / sub).mkdir(parents=True, exist_ok=True)
    predictions[["actual", "predicted"]].to_csv(
        metrics / "confusion" / f"{row}.csv", index=False, lineterminator="\n"
    )
    history = None
    if (results / row / "history.csv").exists():
        history = pd.read_csv(results / row / "history.csv")
        curve = history.drop(columns="fold").groupby("epoch", as_index=False).mean()
        curve.round(6).to_csv(metrics / "curves" / f"{row}.csv", index=False, lineterminator="\n")
    sweep = results / row / "range_test.csv"
    if sweep.exists():  # its header only unless train.lr_policy is range_test: git keeps no empty folder
        sweep_curve = pd.read_csv(sweep).round(6)
        sweep_curve.to_csv(metrics / "range_test" / f"{row}.csv", index=False, lineterminator="\n")
    fig = confusion_figure(predictions, summary["classes"], row)
    fig.savefig(metrics / "images" / f"{row}.png", dpi=80, metadata={"Software": None})
    return summary | {"n_folds": len(summary["folds"])}, history, fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("metrics", type=Path)
    args = parser.parse_args()
    params = load_params()
    rows = sorted(params["ablation"]["rows"])
    corpus, confidence = params["data"]["corpus"], params["ablation"]["confidence"]

    read = {row: read_row(args.results, args.metrics, row, f"evaluate@{row}") for row in rows}
    read[BASELINE] = read_row(args.results, args.metrics, BASELINE, "baseline")
    summaries = {row: summary for row, (summary, _, _) in read.items()}
    models = {row: row_model(params, row) for row in rows}

    frame = table_frame(params, models, summaries, corpus)
    steps = step_comparisons(params, summaries)
    headline = headline_frame(headline_comparisons(params, models, summaries))
    write_tables(frame, corpus, args.metrics / "ablation", steps_frame(steps), confidence, headline)
    write_figure(plot_frame(frame), corpus, confidence, args.metrics / "images" / "ablation.png",
                 args.metrics / "ablation_plot.csv")
    print((args.metrics / "ablation.md").read_text())

    train, tail = params["train"], max(params["train"]["patience"], 1)
    convergence = convergence_frame({row: history for row, (_, history, _) in read.items() if row in rows},
                                    train["max_epochs"], tail)
    (args.metrics / "training.md").write_text(
        convergence_markdown(convergence, train["max_epochs"], train["patience"], tail), encoding="utf-8",
        newline="\n")

    experiment = f"{params['mlflow']['experiment_prefix']}-{corpus}"
    run_ids = log_results(experiment, corpus, args.results, [*rows, BASELINE])
    log_ablation(run_ids, steps, {row: fig for row, (_, _, fig) in read.items()})


if __name__ == "__main__":
    run_stage(main)
