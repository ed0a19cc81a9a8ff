"""The baseline row: logistic regression on per-utterance log-mel statistics.

Every utterance becomes one vector: the mean and the standard deviation over time
of every band of the three channels of the feature store (log-mel, delta,
delta-delta), 2 · n_mels · 3 numbers. On the same speaker folds as the CNN rows
(the first `train.folds`), a scikit-learn logistic regression with balanced class
weights is fitted on the fold's training speakers, standardised like the CNN's
input (`train.standardize`), its C picked from `baseline.C` by the validation
speaker's UA, and applied to the test speaker. The test speaker is read only to
be predicted: it is not an argument of `fit_fold`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from mdser.evaluation import prediction_frame
from mdser.features import input_frames
from mdser.splits import encode_labels, fold_members
from mdser.statistics import unweighted_accuracy

ROW = "baseline"  # the row name in tables, MLflow and `ablation.steps`
TIE_DECIMALS = 12  # UAs equal to this many decimals are a tie (0.5 vs 0.49999999999999994)


def utterance_statistics(frames: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """(len(rows), 2 · n_mels · 3) float64: per utterance, the mean over its frames of
    every (band, channel), then the standard deviation (ddof = 0), each flattened in
    (band, channel) order. `rows` are feature-store index rows (offset, frames)."""
    n_mels, channels = frames.shape[1], frames.shape[2]
    out = np.empty((len(rows), 2 * n_mels * channels), dtype=np.float64)
    for i, (offset, length) in enumerate(zip(rows["offset"], rows["frames"], strict=True)):
        x = np.asarray(frames[int(offset) : int(offset) + int(length)], dtype=np.float64)
        out[i] = np.concatenate([x.mean(axis=0).ravel(), x.std(axis=0).ravel()])
    return out


def standardizer(x: np.ndarray) -> Any:
    """A StandardScaler fitted on `x` (the rows the fold may use for its statistics)."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(x)


def classifier(c: float, max_iter: int) -> Any:
    """The baseline classifier for one C: multinomial logistic regression (lbfgs),
    class_weight="balanced" (the counterpart of the CNN's class-weighted loss)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter, random_state=0)


def class_probabilities(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n_classes) probabilities in the class set's order; a class the training
    speakers lack gets probability 0."""
    probs = np.zeros((len(x), n_classes), dtype=np.float64)
    probs[:, model.classes_] = model.predict_proba(x)
    return probs


def fit_fold(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    cs: list[float], max_iter: int, n_classes: int,
) -> tuple[Any, float, dict[float, float]]:
    """Fit one classifier per C on the (standardised) training speakers and keep the
    one with the best validation-speaker UA; ties (equal to 12 decimals: the same UA
    reached through other per-class recalls) go to the smaller C.

    Returns the chosen model, its C and the validation UA of every C. The test
    speaker is not an argument, so it cannot influence the fit or the choice.
    """
    from sklearn.exceptions import ConvergenceWarning

    best, best_c, best_ua, val_ua = None, None, -1.0, {}
    for c in sorted(cs):
        model = classifier(c, max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, y_train)
        ua = unweighted_accuracy(y_val, class_probabilities(model, x_val, n_classes).argmax(axis=1))
        val_ua[float(c)] = ua
        if round(ua, TIE_DECIMALS) > round(best_ua, TIE_DECIMALS):  # a tie keeps the smaller C
            best, best_c, best_ua = model, float(c), ua
    return best, best_c, val_ua


def baseline_predictions(
    params: dict[str, Any], feature_store: Any, folds_doc: dict[str, Any],
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The baseline on every selected fold: test predictions and the C selection.

    Predictions have evaluate's columns (fold, utt_id, speaker, actual, predicted,
    p_<class> rounded to 6 decimals); the selection lists, per fold, the chosen C
    and the validation UA of every C. With `train.standardize: speaker` the frames are
    first speaker-normalised (`features.speaker_standardized`), as the CNN's are. The
    statistics are then standardised with the fold's training speakers (train, speaker)
    or every utterance (`global`, the paper's corpus-level normalisation), as in
    `training.fit_fold`.
    """
    from mdser.stores import open_fold_features

    train, base, classes = params["train"], params["baseline"], folds_doc["classes"]
    index, frames, _, selected = open_fold_features(feature_store, folds_doc, train["folds"])
    frames = input_frames(frames, index, train["standardize"])
    stats = utterance_statistics(frames, index)  # index order: one row per utterance
    position = pd.Series(np.arange(len(index)), index=index.index)
    parts, selection = [], []
    for fold in selected:
        members = fold_members(index, fold)
        x = {r: stats[position[members[r].index].to_numpy()] for r in ("train", "val", "test")}
        y = {r: encode_labels(members[r], classes) for r in ("train", "val")}
        scaler = standardizer(stats if train["standardize"] == "global" else x["train"])
        model, c, val_ua = fit_fold(
            scaler.transform(x["train"]), y["train"], scaler.transform(x["val"]), y["val"],
            base["C"], base["max_iter"], len(classes),
        )
        probs = class_probabilities(model, scaler.transform(x["test"]), len(classes))
        parts.append(prediction_frame(fold["fold"], members["test"].reset_index(drop=True), probs, classes))
        selection.append({
            "fold": int(fold["fold"]), "test_speaker": fold["test"], "C": c,
            "val_ua": {str(k): v for k, v in val_ua.items()},
            "iterations": int(np.max(model.n_iter_)),
        })
    return pd.concat(parts, ignore_index=True), selection
