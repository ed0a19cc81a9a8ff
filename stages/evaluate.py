"""DVC stage `evaluate@<row>`: test UA/WA per fold, mean ± std, and what `ablate` logs
to MLflow for the row (results/<row>/run.json).

    python stages/evaluate.py <row> data/features data/splits.json models/<row> \
        results/<row> metrics/rows/<row>.json
"""

import argparse
import json
from pathlib import Path

import pandas as pd

from mdser.errors import run_stage
from mdser.evaluation import row_metrics, summarize, test_predictions
from mdser.params import load_params, row_model
from mdser.splits import read_folds
from mdser.stores import atomic_dir, tree_hash

# What each fold's training chose, logged beside its fold number in MLflow.
FOLD_PARAMS = ("best_epoch", "epochs", "lr_min", "lr_max", "lr_source")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("row")
    parser.add_argument("features", type=Path)
    parser.add_argument("folds", type=Path)
    parser.add_argument("models", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("metrics", type=Path)
    args = parser.parse_args()
    params = load_params()
    model = row_model(params, args.row)
    folds_doc = read_folds(args.folds)

    predictions = test_predictions(params, args.features, folds_doc, args.models)
    summary = summarize(predictions, folds_doc["classes"], params["ablation"]["confidence"])
    fold_dirs = {f["fold"]: args.models / f"fold_{f['fold']}" for f in summary["folds"]}
    histories = {k: pd.read_csv(d / "history.csv") for k, d in fold_dirs.items()}
    range_tests = {k: pd.read_csv(d / "range_test.csv") for k, d in fold_dirs.items()}
    fold_stats = {k: json.loads((d / "fold.json").read_text()) for k, d in fold_dirs.items()}
    run = {  # for tracking.log_results
        "stage": f"evaluate@{args.row}",
        "inputs_hash": tree_hash(args.models, args.features / "meta.json", args.folds),
        "params": {"model": model, "train": params["train"], model["head"]: params[model["head"]],
                   "data": {"corpus": params["data"]["corpus"]}},
        "fold_params": {k: {n: str(st[n]) for n in FOLD_PARAMS} for k, st in fold_stats.items()},
        "environment": {n: fold_stats[min(fold_stats)][n] for n in ("device", "cpu_flags", "tensorflow")},
    }
    with atomic_dir(args.out) as out:
        predictions.to_csv(out / "predictions.csv", index=False, lineterminator="\n")
        for name, frames in (("history", histories), ("range_test", range_tests)):
            joined = pd.concat([h.assign(fold=k) for k, h in frames.items()], ignore_index=True)
            joined.to_csv(out / f"{name}.csv", index=False, lineterminator="\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (out / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(row_metrics(summary), indent=2, sort_keys=True) + "\n")
    print(f"{args.row}: test UA {100 * summary['ua_mean']:.2f} ± {100 * summary['ua_std']:.2f} "
          f"over {len(summary['folds'])} folds")


if __name__ == "__main__":
    run_stage(main)
