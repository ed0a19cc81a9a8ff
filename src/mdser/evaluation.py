"""Evaluation (paper section "Speaker-independent experiment"): UA, WA and friends.

UA, the paper's metric, is the unweighted mean of per-class recalls over the
classes present in the reference; WA is plain accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mdser.statistics import unweighted_accuracy, weighted_accuracy


def summarize(predictions: pd.DataFrame, classes: list[str], confidence: float = 0.95) -> dict[str, Any]:
    """Per-fold and pooled metrics of one ablation row from its test predictions.

    `predictions` has columns fold, speaker, actual, predicted (class names).
    `ua_ci_low`/`ua_ci_high`: the `confidence` Student-t interval of the mean fold
    UA (`mdser.statistics.t_interval`; None with fewer than 2 folds).
    """
    from mdser.statistics import class_recalls, confusion_counts, macro_f1, t_interval

    n = len(classes)
    code = {c: i for i, c in enumerate(classes)}
    y = predictions["actual"].map(code).to_numpy()
    p = predictions["predicted"].map(code).to_numpy()
    folds = []
    for fold, part in predictions.groupby("fold", sort=True):
        yt, yp = part["actual"].map(code).to_numpy(), part["predicted"].map(code).to_numpy()
        folds.append({
            "fold": int(fold), "test_speaker": str(part["speaker"].iloc[0]),
            "ua": unweighted_accuracy(yt, yp), "wa": weighted_accuracy(yt, yp),
            "macro_f1": macro_f1(confusion_counts(yt, yp, n)), "n": int(len(part)),
        })
    per_fold = pd.DataFrame(folds)
    confusion = confusion_counts(y, p, n)
    interval = t_interval(per_fold["ua"], confidence)
    return {
        "folds": folds,
        "ua_mean": float(per_fold["ua"].mean()), "ua_std": float(per_fold["ua"].std(ddof=0)),
        "ua_ci_low": None if interval is None else interval[0],
        "ua_ci_high": None if interval is None else interval[1],
        "confidence": confidence,
        "wa_mean": float(per_fold["wa"].mean()), "wa_std": float(per_fold["wa"].std(ddof=0)),
        "macro_f1_mean": float(per_fold["macro_f1"].mean()),
        "pooled_ua": unweighted_accuracy(y, p), "pooled_wa": weighted_accuracy(y, p),
        "pooled_macro_f1": macro_f1(confusion),
        "recall": {c: float(r) for c, r in zip(classes, class_recalls(confusion), strict=True)},
        "confusion": confusion.tolist(),
        "classes": classes,
    }


def test_predictions(
    params: dict[str, Any], feature_store: Any, folds_doc: dict[str, Any], models_dir: Any,
) -> pd.DataFrame:
    """Each trained fold's model on its test speaker: one row per utterance.

    The probabilities are the ones `train` wrote beside each fold's weights
    (`row_training.score_test_speaker`), so evaluating needs no TensorFlow; the utterances
    must be the fold's test speaker's in the feature store, or the models are stale.
    """
    from mdser.errors import UserError
    from mdser.splits import fold_members
    from mdser.stores import TEST_PROBABILITIES_FILE, read_index

    index = read_index(feature_store)
    classes = folds_doc["classes"]
    parts = []
    for fold in folds_doc["folds"][: params["train"]["folds"]]:
        path = models_dir / f"fold_{fold['fold']}" / TEST_PROBABILITIES_FILE
        scored = pd.read_csv(path, dtype={"utt_id": str})
        test = fold_members(index, fold)["test"].reset_index(drop=True)
        if list(scored["utt_id"]) != list(test["utt_id"]) or list(scored.columns[1:]) != classes:
            raise UserError(f"{path}: not the test utterances {fold['test']!r} of fold "
                            f"{fold['fold']} and classes {classes}; re-run `dvc repro`")
        probs = scored[classes].to_numpy(np.float32)
        parts.append(prediction_frame(fold["fold"], test, probs, classes))
    return pd.concat(parts, ignore_index=True)


def prediction_frame(fold: int, test: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per test utterance: fold, utt_id, speaker, actual, predicted, p_<class> (6 decimals)."""
    part = pd.DataFrame({
        "fold": fold, "utt_id": test["utt_id"], "speaker": test["speaker"],
        "actual": test["emotion"], "predicted": [classes[i] for i in probs.argmax(axis=1)],
    })
    for c, column in zip(classes, probs.T, strict=True):
        part[f"p_{c}"] = np.round(column, 6)
    return part


def row_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """What `metrics/rows/<row>.json` holds: the summary's means and every fold's UA and WA."""
    metrics = {k: summary[k] for k in ("ua_mean", "ua_std", "wa_mean", "wa_std", "pooled_ua")}
    metrics["folds"] = {str(f["fold"]): {"ua": f["ua"], "wa": f["wa"]} for f in summary["folds"]}
    return metrics


def confusion_figure(predictions: pd.DataFrame, classes: list[str], title: str = "") -> Any:
    """A matplotlib figure of the confusion matrix (rows: actual, columns: predicted).

    A bare `matplotlib.figure.Figure` (Agg canvas), not pyplot: no pyplot import and no
    global figure registry in the stage."""
    from matplotlib.figure import Figure

    from mdser.statistics import confusion_counts

    code = {c: i for i, c in enumerate(classes)}
    cm = confusion_counts(predictions["actual"].map(code), predictions["predicted"].map(code), len(classes))
    fig = Figure(figsize=(1.0 + 0.7 * len(classes), 0.8 + 0.7 * len(classes)))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig
