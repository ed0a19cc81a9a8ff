"""DVC stage `ablate`: the paper's Table 1 and Table 3 from every row's test results.

    python stages/ablate.py results metrics
"""

import argparse
import json
from pathlib import Path

import pandas as pd

from mdser.ablation import table_frame, write_tables
from mdser.errors import UserError, run_stage
from mdser.evaluation import confusion_figure
from mdser.params import load_params, row_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("metrics", type=Path)
    args = parser.parse_args()
    params = load_params()
    rows = sorted(params["ablation"]["rows"])

    summaries, models = {}, {}
    for row in rows:
        path = args.results / row / "summary.json"
        if not path.exists():
            raise UserError(f"{path}: missing; run `dvc repro evaluate@{row}`")
        summary = json.loads(path.read_text())
        summaries[row] = summary | {"n_folds": len(summary["folds"])}
        models[row] = row_model(params, row)
        predictions = pd.read_csv(args.results / row / "predictions.csv")
        for sub in ("confusion", "curves", "images"):
            (args.metrics / sub).mkdir(parents=True, exist_ok=True)
        predictions[["actual", "predicted"]].to_csv(
            args.metrics / "confusion" / f"{row}.csv", index=False, lineterminator="\n"
        )
        history = pd.read_csv(args.results / row / "history.csv")
        curve = history.drop(columns="fold").groupby("epoch", as_index=False).mean()
        curve.round(6).to_csv(args.metrics / "curves" / f"{row}.csv", index=False, lineterminator="\n")
        fig = confusion_figure(predictions, summary["classes"], row)
        fig.savefig(args.metrics / "images" / f"{row}.png", dpi=80, metadata={"Software": None})

    corpus = params["data"]["corpus"]
    frame = table_frame(params, models, summaries, corpus)
    write_tables(frame, corpus, args.metrics / "ablation")
    print((args.metrics / "ablation.md").read_text())


if __name__ == "__main__":
    run_stage(main)
