"""DVC stage `train@<row>`: one model per speaker fold, best checkpoint by validation UA.

    python stages/train.py <row> data/features data/splits.json models/<row>
"""

import argparse
from pathlib import Path

from mdser.errors import run_stage
from mdser.params import load_params, row_model
from mdser.row_training import train_row
from mdser.runtime import main_repo_root
from mdser.splits import read_folds
from mdser.stores import atomic_dir
from mdser.tracking import log_failure
from mdser.training import TrainingDiverged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("row")
    parser.add_argument("features", type=Path)
    parser.add_argument("folds", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    params = load_params()
    model = row_model(params, args.row)
    resume = main_repo_root() / ".cache" / "resume" / args.row

    try:
        with atomic_dir(args.out) as out:
            folds = train_row(params, args.row, model, args.features, read_folds(args.folds), out, resume)
    except TrainingDiverged as exc:
        experiment = f"{params['mlflow']['experiment_prefix']}-{params['data']['corpus']}"
        log_failure(params["data"]["corpus"], args.row, exc.fold, str(exc), experiment)
        raise
    for f in folds:
        print(f"{args.row} fold {f['fold']}: best epoch {f['best_epoch']}, val UA {f['val_ua']:.4f}")


if __name__ == "__main__":
    run_stage(main)
