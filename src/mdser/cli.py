"""The `mdser` command: use a trained ablation row outside the pipeline.

    mdser predict [--row ROW] [--json] FILE...   emotion and class probabilities per file
    mdser export [ROW] [--force]                 exports/<row>/: SavedModel, ONNX, MLflow

Run from the repository root: both read params.yaml, models/<row>/ and data/splits.json
(the class names) as the pipeline left them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mdser import predict as prediction
from mdser.errors import UserError, run_stage

PREDICT_HELP = """\
Classify audio files (wav, flac, ...; any sample rate, mono or stereo) with one ablation
row. The row's prediction is the ensemble of its fold models (models/<row>/fold_k/): each
fold's model, applied with its own training standardisation, gives class probabilities,
and the row's are their mean; the emotion is the most probable class. Audio goes through
the pipeline's path: mono mix-down, resampling to audio.sample_rate, the 3-channel log-mel
of params.yaml `features`; with train.standardize: speaker, the files of one call are
normalised together as one speaker's recordings. A file that cannot be used (missing, not
audio, shorter than data.min_duration) gets one line on stderr; the others are still
classified, and the exit status is 1 if any file failed."""

EXPORT_HELP = """\
Export a row's fold ensemble (the model `mdser predict` applies, standardisation included)
to exports/<row>/ as a TensorFlow SavedModel and ONNX, with inputs `features` (batch,
n_mels, frames, 3; unstandardised log-mel, zero-padded) and `lengths` (batch,), and output
`probabilities`; log it to MLflow and register it as mdser-<corpus>-<row> with the alias
`best` if the row is the best of metrics/ablation.json, else `candidate`."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mdser", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--params", type=Path, default=Path("params.yaml"))
    paths.add_argument("--models", type=Path, default=Path("models"),
                       help="the folder of the rows' trained models (default: models)")
    paths.add_argument("--folds", type=Path, default=Path("data/splits.json"),
                       help="the split the models were trained on: its class names (default: %(default)s)")
    paths.add_argument("--table", type=Path, default=prediction.ABLATION_TABLE,
                       help="the ablation table that names the best row (default: %(default)s)")

    p = sub.add_parser("predict", parents=[paths], help="classify audio files", description=PREDICT_HELP)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--row", help="ablation row (default: the best row of --table)")
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")

    e = sub.add_parser("export", parents=[paths], help="SavedModel, ONNX and MLflow model of a row",
                       description=EXPORT_HELP)
    e.add_argument("row", nargs="?", help="ablation row (default: the best row of --table)")
    e.add_argument("--out", type=Path, default=Path("exports"), help="(default: exports)")
    e.add_argument("--no-mlflow", action="store_true", help="only write the files")
    e.add_argument("--force", action="store_true", help="replace an existing export of the row")
    return top


def run_predict(args: argparse.Namespace, params: dict) -> int:
    row = args.row or prediction.best_row(args.table)
    models = prediction.load_row(params, row, args.models / row, args.folds)
    results, errors = prediction.classify(args.files, params, models)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps([r | {"row": row} for r in results], indent=2))
    elif results:
        speaker = (f"; the {len(results)} file(s) normalised together as one speaker"
                   if params["train"]["standardize"] == "speaker" else "")
        print(f"row {row}, ensemble of folds {[f.fold for f in models.folds]}{speaker}")
        print(prediction.format_table(results, models.classes))
    return 1 if errors else 0


def run_export(args: argparse.Namespace, params: dict) -> int:
    from mdser.export import ALIASES, export_row, log_export

    best = None
    if args.table.exists() or not args.row:
        best = prediction.best_row(args.table)
    row = args.row or best
    out = args.out / row
    if out.exists() and not args.force:
        raise UserError(f"{out}: an earlier export is there; pass --force to replace it")
    models = prediction.load_row(params, row, args.models / row, args.folds)
    export_row(params, models, out)
    print(f"{row}: SavedModel {out / 'saved_model'}, ONNX {out / 'model.onnx'}")
    if not args.no_mlflow:
        alias = ALIASES[row == best]
        name, version = log_export(params, out, alias)
        print(f"MLflow: registered model {name} version {version}, alias {alias!r}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from mdser.params import load_params

    def command() -> None:
        params = load_params(args.params)
        status = {"predict": run_predict, "export": run_export}[args.command](args, params)
        if status:
            sys.exit(status)

    run_stage(command)


if __name__ == "__main__":
    main()
