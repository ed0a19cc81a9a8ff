"""Classify audio files with one ablation row's trained models (`mdser predict`).

A row's prediction is the **ensemble of its fold models**: every `models/<row>/fold_k/`
that `train@<row>` wrote gives class probabilities, each with its own fold's
standardisation statistics (`fold.json` mean and std, the ones its training used), and
the row's probabilities are their mean; the predicted emotion is the most probable class.
Each fold model is applied exactly as `evaluate@<row>` applies it (`Predictor`: the
same padding, standardisation and traced inference).

A file goes through the pipeline's own audio path: decoded and checked by
`audio.read_audio` (shorter than `data.min_duration` is an error, as in the manifest),
down-mixed to mono and resampled to `audio.sample_rate` as the `resample` stage does,
then the 3-channel log-mel of `features.three_channel` with the `features` parameters.
With `train.standardize: speaker` the files of one call are taken as one speaker's
recordings and speaker-normalised together (`features.speaker_standardized`), as
training normalised each speaker: give several recordings of the same voice.

The default row is the best one of `metrics/ablation.json` (`best_row`): the highest
mean test UA over both tables, the baseline excluded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.audio import AudioError, read_audio, resample, to_mono
from mdser.errors import UserError
from mdser.features import input_frames, three_channel
from mdser.params import row_model
from mdser.splits import read_folds

ABLATION_TABLE = Path("metrics/ablation.json")
TABLES = ("table1", "table3")  # metrics/ablation.json also holds "steps", which are not rows
BASELINE = "baseline"  # = mdser.ablation.BASELINE: the logistic regression, no model to load
MIN_FRAMES = 2  # the model's shortest input (model.build_model: one frame after the first pooling)


def best_row(table: Path = ABLATION_TABLE) -> str:
    """The row with the highest mean test UA in `ablation.json` (ties: the first name in order)."""
    if not table.exists():
        raise UserError(f"{table}: missing; run `dvc repro ablate` or name a row with --row")
    doc = json.loads(table.read_text())
    uas = {row: line["ua_mean"] for name in TABLES for row, line in doc.get(name, {}).items()
           if row != BASELINE and line.get("ua_mean") is not None}
    if not uas:
        raise UserError(f"{table}: no row with a test UA; run `dvc repro ablate` or name a row with --row")
    return max(sorted(uas), key=lambda row: uas[row])


@dataclass(frozen=True)
class FoldModel:
    """One trained fold: its weights and the standardisation its training used."""

    fold: int
    weights: Path
    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True)
class RowModels:
    """An ablation row's trained fold models and what it takes to rebuild and apply them."""

    row: str
    model_params: dict[str, Any]
    classes: list[str]
    folds: list[FoldModel]


def load_row(params: dict[str, Any], row: str, models_dir: Path, folds_path: Path) -> RowModels:
    """The fold models `train@<row>` wrote into `models_dir`; the class names from `folds_path`."""
    model_params = row_model(params, row)
    classes = read_folds(folds_path)["classes"]
    dirs = sorted(models_dir.glob("fold_*/fold.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not dirs:
        raise UserError(f"{models_dir}: no trained fold model; run `dvc repro train@{row}`")
    folds = []
    for path in dirs:
        stats = json.loads(path.read_text())
        weights = path.parent / "model.weights.h5"
        if not weights.exists():
            raise UserError(f"{weights}: missing; run `dvc repro train@{row}`")
        folds.append(FoldModel(int(stats["fold"]), weights, np.asarray(stats["mean"], np.float32),
                               np.asarray(stats["std"], np.float32)))
    return RowModels(row, model_params, classes, folds)


def file_features(path: Path, params: dict[str, Any]) -> np.ndarray:
    """(frames, n_mels, 3) of one audio file through the pipeline's audio path; AudioError if unusable."""
    y, sr = read_audio(path, params["data"]["min_duration"])
    sample_rate = params["audio"]["sample_rate"]
    x = three_channel(resample(to_mono(y), sr, sample_rate), sample_rate, params["features"])
    if len(x) < MIN_FRAMES:  # only reachable with data.min_duration near 0
        raise AudioError("too_short", path, f"{len(x)} frame(s) < {MIN_FRAMES}")
    return x


def fold_probabilities(
    params: dict[str, Any], models: RowModels, frames: np.ndarray, rows: pd.DataFrame,
) -> np.ndarray:
    """(folds, utterances, classes): each fold model's probabilities, applied as `evaluate` does."""
    from mdser.batching import Predictor
    from mdser.model import build_model
    from mdser.runtime import configure

    configure(params["train"])
    model = build_model(models.model_params, len(models.classes), n_mels=frames.shape[1])
    head = models.model_params["head"]
    predict = Predictor(model, head, params[head])  # traced once, all folds
    out = []
    for fold in models.folds:
        model.load_weights(fold.weights)
        out.append(predict(frames, rows, fold.mean, fold.std, params["train"]["batch_frames"]))
    return np.stack(out)


def classify(
    paths: list[Path], params: dict[str, Any], models: RowModels,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The ensemble's prediction for every usable file, and one error line per unusable one.

    A result is {"file", "emotion", "probabilities": {class: p}}, in the order of `paths`.
    """
    features, results, errors = [], [], []
    for path in paths:
        try:
            features.append(file_features(Path(path), params))
            results.append({"file": str(path)})
        except AudioError as exc:
            errors.append(str(exc))
    if not features:
        return [], errors
    lengths = np.array([len(x) for x in features])
    rows = pd.DataFrame({"offset": np.concatenate([[0], np.cumsum(lengths)[:-1]]), "frames": lengths,
                         "speaker": "given"})  # the files of one call: one speaker's recordings
    frames = input_frames(np.concatenate(features), rows, params["train"]["standardize"])
    probs = fold_probabilities(params, models, frames, rows).mean(axis=0)
    for result, p in zip(results, probs, strict=True):
        result["emotion"] = models.classes[int(p.argmax())]
        result["probabilities"] = {c: float(v) for c, v in zip(models.classes, p, strict=True)}
    return results, errors


def format_table(results: list[dict[str, Any]], classes: list[str]) -> str:
    """One line per file: the file, the predicted emotion and every class's probability."""
    width = max([len("file")] + [len(r["file"]) for r in results])
    name = max(len(c) for c in ["emotion", *classes])
    lines = [f"{'file':<{width}}  {'emotion':<{name}}" + "".join(f"  {c:>{max(len(c), 5)}}" for c in classes)]
    for r in results:
        lines.append(f"{r['file']:<{width}}  {r['emotion']:<{name}}"
                     + "".join(f"  {r['probabilities'][c]:>{max(len(c), 5)}.3f}" for c in classes))
    return "\n".join(lines)
