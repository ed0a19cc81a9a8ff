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
    from sklearn.metrics import confusion_matrix, f1_score, recall_score  # here: `train` skips its import

    from mdser.statistics import t_interval

    labels = list(range(len(classes)))
    code = {c: i for i, c in enumerate(classes)}
    y = predictions["actual"].map(code).to_numpy()
    p = predictions["predicted"].map(code).to_numpy()
    folds = []
    for fold, part in predictions.groupby("fold", sort=True):
        yt, yp = part["actual"].map(code).to_numpy(), part["predicted"].map(code).to_numpy()
        folds.append({
            "fold": int(fold), "test_speaker": str(part["speaker"].iloc[0]),
            "ua": unweighted_accuracy(yt, yp), "wa": weighted_accuracy(yt, yp),
            "macro_f1": float(f1_score(yt, yp, labels=labels, average="macro", zero_division=0)),
            "n": int(len(part)),
        })
    per_fold = pd.DataFrame(folds)
    recall = recall_score(y, p, labels=labels, average=None, zero_division=0)
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
        "pooled_macro_f1": float(f1_score(y, p, labels=labels, average="macro", zero_division=0)),
        "recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "confusion": confusion_matrix(y, p, labels=labels).tolist(),
        "classes": classes,
    }


def test_predictions(
    params: dict[str, Any], model_params: dict[str, Any], feature_store: Any,
    folds_doc: dict[str, Any], models_dir: Any,
) -> pd.DataFrame:
    """Each trained fold's model applied to its test speaker: one row per utterance."""
    import json

    from mdser.batching import Predictor
    from mdser.model import build_model
    from mdser.runtime import configure
    from mdser.splits import fold_members
    from mdser.stores import open_features

    configure(params["train"])
    index, frames = open_features(feature_store)
    classes = folds_doc["classes"]
    model = build_model(model_params, len(classes), n_mels=frames.shape[1])
    predict = Predictor(model, model_params["head"], params[model_params["head"]])  # traced once, all folds
    parts = []
    for fold in folds_doc["folds"][: params["train"]["folds"]]:
        fold_dir = models_dir / f"fold_{fold['fold']}"
        stats = json.loads((fold_dir / "fold.json").read_text())
        model.load_weights(fold_dir / "model.weights.h5")
        test = fold_members(index, fold)["test"].reset_index(drop=True)
        mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
        probs = predict(frames, test, mean, std, params["train"]["batch_frames"])
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
    """A matplotlib figure of the confusion matrix (rows: actual, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(predictions["actual"], predictions["predicted"], labels=classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(classes), 0.8 + 0.7 * len(classes)))
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
