"""Rebuild the ablation table from MLflow alone (the parent run of each row).

    python -m mdser.table_from_mlflow metrics/ablation_from_mlflow

Writes <stem>.md/.csv/.json exactly like the `ablate` stage does from DVC's
files, so `cmp metrics/ablation.md metrics/ablation_from_mlflow.md` checks them:
the aggregate metrics come from each row's latest finished parent run (the
baseline's too), the per-fold UAs behind the intervals and the paired step
comparisons from that run's fold runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mdser.ablation import (
    BASELINE,
    headline_comparisons,
    headline_frame,
    step_comparisons,
    steps_frame,
    table_frame,
    write_tables,
)
from mdser.errors import UserError, run_stage
from mdser.params import load_params, row_model
from mdser.tracking import summaries_from_mlflow, tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stem", type=Path, help="output path without suffix")
    args = parser.parse_args()
    params = load_params()
    corpus = params["data"]["corpus"]
    rows = sorted(params["ablation"]["rows"])
    experiment = f"{params['mlflow']['experiment_prefix']}-{corpus}"
    summaries = summaries_from_mlflow(experiment, [*rows, BASELINE])
    missing = sorted(set(rows) - set(summaries)) + ([] if BASELINE in summaries else [BASELINE])
    if missing:
        raise UserError(
            f"experiment {experiment!r} at {tracking_uri()} has no finished run for rows {missing}"
        )
    models = {row: row_model(params, row) for row in rows}
    args.stem.parent.mkdir(parents=True, exist_ok=True)
    frame = table_frame(params, models, summaries, corpus)
    steps = steps_frame(step_comparisons(params, summaries))
    headline = headline_frame(headline_comparisons(params, models, summaries))
    write_tables(frame, corpus, args.stem, steps, params["ablation"]["confidence"], headline)
    print(f"{len(rows)} rows and the baseline from {experiment!r} -> {args.stem}.md")


if __name__ == "__main__":
    run_stage(main)
