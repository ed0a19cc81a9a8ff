"""DVC stage `baseline`: logistic regression on per-utterance log-mel statistics, the
floor of every ablation table, on the same speaker folds as the CNN rows.

    python stages/baseline.py data/features data/splits.json results/baseline \
        metrics/rows/baseline.json

Writes results/baseline/{predictions.csv,summary.json,run.json} in evaluate's formats
(plus selection.json: the C picked per fold) and metrics/rows/baseline.json like
evaluate's; `ablate` logs them to MLflow as the parent run "baseline" with a child per fold.
"""

import argparse
import json
from importlib.metadata import version
from pathlib import Path

from mdser.baseline import ROW, baseline_predictions
from mdser.errors import run_stage
from mdser.evaluation import row_metrics, summarize
from mdser.params import load_params
from mdser.runtime import cpu_flags, cpu_name
from mdser.splits import read_folds
from mdser.stores import atomic_dir, tree_hash


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("features", type=Path)
    parser.add_argument("folds", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("metrics", type=Path)
    args = parser.parse_args()
    params = load_params()
    folds_doc = read_folds(args.folds)
    corpus, classes = params["data"]["corpus"], folds_doc["classes"]

    predictions, selection = baseline_predictions(params, args.features, folds_doc)
    summary = summarize(predictions, classes, params["ablation"]["confidence"])
    run = {  # for tracking.log_results
        "stage": "baseline", "inputs_hash": tree_hash(args.features / "meta.json", args.folds),
        "params": {"baseline": params["baseline"], "data": {"corpus": corpus},
                   "train": {k: params["train"][k] for k in ("folds", "standardize")}},
        "fold_params": {s["fold"]: {"C": str(s["C"])} for s in selection},
        "environment": {"device": cpu_name(),
                        "cpu_flags": cpu_flags(), "sklearn": version("scikit-learn")},
        "artifacts": ["selection.json"],
    }
    with atomic_dir(args.out) as out:
        predictions.to_csv(out / "predictions.csv", index=False, lineterminator="\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (out / "selection.json").write_text(json.dumps(selection, indent=2, sort_keys=True) + "\n")
        (out / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(row_metrics(summary), indent=2, sort_keys=True) + "\n")

    chosen = ", ".join(f"fold {s['fold']}: C = {s['C']:g}" for s in selection)
    print(f"{ROW}: test UA {100 * summary['ua_mean']:.2f} ± {100 * summary['ua_std']:.2f} "
          f"over {len(summary['folds'])} folds ({chosen})")


if __name__ == "__main__":
    run_stage(main)
