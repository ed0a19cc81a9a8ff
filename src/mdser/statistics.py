"""Intervals and paired tests over speaker folds, so that the table can rank its rows.

Every ablation row is tested on the same speakers (one fold per test speaker), so
two rows are compared *paired*, fold by fold. Two small pieces:

* `t_interval`: the Student-t confidence interval of a mean over folds: of a row's
  UA, and of the per-fold differences between two rows (the paired t interval);
* `wilcoxon_p`: the two-sided Wilcoxon signed-rank p-value of those differences,
  the check that assumes only symmetric differences, with `smallest_wilcoxon_p`, the lowest p
  that n folds can give at all.

`paired_comparison` puts them together for one ablation step. (A percentile bootstrap
of the fold differences was the interval before: with 4 folds it resamples only 4
values and came out about half as wide as the t interval; README, "Tables that rank
rows".) Below them, the per-fold metrics of the paper's evaluation: UA (its metric),
WA, the confusion matrix, per-class recall and macro F1, in numpy (tested against
scikit-learn), so that `evaluate` imports neither TensorFlow nor scikit-learn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DECIMALS = 12  # differences are rounded to this many decimals: equal UAs give exact zeros and ties


def t_interval(values: Any, confidence: float) -> tuple[float, float] | None:
    """The `confidence` Student-t interval of the mean of `values`.

    mean ± t_{(1 + confidence) / 2, n - 1} · s / √n, with s the sample standard
    deviation (ddof = 1). None for fewer than 2 values (no interval exists); a
    degenerate [mean, mean] when all values are equal.
    """
    from scipy.special import stdtrit  # the Student-t quantile (scipy.stats.t.ppf, lighter)

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    mean = float(x.mean())
    half = float(stdtrit(x.size - 1, (1 + confidence) / 2)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean - half, mean + half


def wilcoxon_p(differences: Any) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired `differences` (scipy).

    Zero differences are dropped (Wilcoxon's convention, scipy's default); the p
    is exact for n ≤ 50 distinct nonzero differences, from all sign permutations
    when there are ties or zeros (n ≤ 13). 1.0 when no nonzero difference is left
    (the two rows agree on every fold: no evidence of a difference).
    """
    from scipy import stats

    d = np.round(np.asarray(differences, dtype=np.float64), DECIMALS)
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def smallest_wilcoxon_p(differences: Any) -> float:
    """The lowest two-sided Wilcoxon p that these many nonzero differences can reach.

    With n nonzero differences, the most extreme outcome (all of one sign) has
    probability 2 / 2^n under the null, so p < 2 / 2^n is impossible: with 3 folds
    no difference can be significant at 5 %. 1.0 when all differences are zero.
    """
    n = int(np.count_nonzero(np.round(np.asarray(differences, dtype=np.float64), DECIMALS)))
    return min(1.0, 2.0 / 2**n)


def paired_comparison(row_ua: Any, base_ua: Any, confidence: float) -> dict[str, Any]:
    """One ablation step: a row's fold UAs against its base row's, fold by fold.

    `row_ua` and `base_ua` are aligned (same test speakers, same order). Returns the
    number of folds `n`, the mean difference `delta` (row − base), its paired
    Student-t interval `ci_low`/`ci_high` (None below 2 folds), the Wilcoxon `p`, the
    smallest attainable `p_min`, and `significant`: the interval excludes 0, i.e. the
    two-sided paired t-test rejects at 1 − `confidence` (None when there is no interval).
    """
    a, b = np.asarray(row_ua, dtype=np.float64), np.asarray(base_ua, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired fold UAs must be two equal-length, non-empty lists: {a.shape}, {b.shape}")
    d = np.round(a - b, DECIMALS)  # a fold both rows got equally right is an exact 0
    interval = t_interval(d, confidence)
    return {
        "n": int(d.size),
        "delta": float(d.mean()),
        "ci_low": None if interval is None else interval[0],
        "ci_high": None if interval is None else interval[1],
        "p": wilcoxon_p(d),
        "p_min": smallest_wilcoxon_p(d),
        "significant": None if interval is None else bool(interval[0] > 0 or interval[1] < 0),
    }


def unweighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over classes present in y_true of recall = correct_c / N_c."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def weighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = actual class index, column = predicted."""
    counts = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return counts


def class_recalls(confusion: np.ndarray) -> np.ndarray:
    """Per-class recall tp_c / N_c of a confusion matrix; 0 for a class with no utterance."""
    actual = confusion.sum(axis=1)
    return np.divide(np.diag(confusion), actual, out=np.zeros(len(actual)), where=actual > 0)


def macro_f1(confusion: np.ndarray) -> float:
    """Mean over all classes of F1_c = 2 tp_c / (2 tp_c + fp_c + fn_c); 0 where undefined."""
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # = 2 tp + fp + fn
    return float(np.mean(np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)))
