"""UA/WA/per-class metrics against scikit-learn."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
)

from mdser.evaluation import summarize
from mdser.statistics import (
    class_recalls,
    confusion_counts,
    macro_f1,
    unweighted_accuracy,
    weighted_accuracy,
)


def test_ua_is_balanced_accuracy_and_wa_is_accuracy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 5, 200)
        p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
        assert np.isclose(unweighted_accuracy(y, p), balanced_accuracy_score(y, p))
        assert np.isclose(weighted_accuracy(y, p), accuracy_score(y, p))


def test_confusion_recall_and_macro_f1_are_scikit_learns():
    """Including classes never predicted, never present, and a class absent from both."""
    rng = np.random.default_rng(1)
    labels = list(range(6))
    for trial in range(30):
        y = rng.integers(0, 4 if trial % 3 else 6, 60)
        p = np.where(rng.random(60) < 0.5, y, rng.integers(0, 5, 60))
        cm = confusion_counts(y, p, 6)
        assert cm.tolist() == confusion_matrix(y, p, labels=labels).tolist()
        np.testing.assert_allclose(class_recalls(cm), recall_score(
            y, p, labels=labels, average=None, zero_division=0), rtol=0, atol=1e-15)
        assert macro_f1(cm) == pytest.approx(
            f1_score(y, p, labels=labels, average="macro", zero_division=0), abs=1e-15)


def test_ua_differs_from_wa_under_imbalance():
    y = np.array([0] * 90 + [1] * 10)
    p = np.zeros(100, int)
    assert weighted_accuracy(y, p) == 0.9 and unweighted_accuracy(y, p) == 0.5


def test_summarize_per_fold_and_pooled():
    classes = ["a", "b", "c"]
    pred = pd.DataFrame({
        "fold": [0, 0, 0, 1, 1, 1], "speaker": ["s0"] * 3 + ["s1"] * 3,
        "actual": ["a", "b", "c", "a", "a", "b"], "predicted": ["a", "b", "a", "a", "b", "b"],
    })
    s = summarize(pred, classes)
    assert [f["ua"] for f in s["folds"]] == [2 / 3, 0.75]
    assert np.isclose(s["ua_mean"], (2 / 3 + 0.75) / 2)
    assert np.isclose(s["ua_std"], np.std([2 / 3, 0.75]))
    code = {c: i for i, c in enumerate(classes)}
    y, p = pred["actual"].map(code), pred["predicted"].map(code)
    assert np.isclose(s["pooled_ua"], balanced_accuracy_score(y, p))
    assert s["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert s["recall"] == {"a": 2 / 3, "b": 1.0, "c": 0.0}


def test_summarize_gives_the_t_interval_of_the_fold_uas():
    classes = ["a", "b"]
    rng = np.random.default_rng(0)
    pred = pd.DataFrame({
        "fold": np.repeat([0, 1, 2, 3], 10), "speaker": np.repeat(["s0", "s1", "s2", "s3"], 10),
        "actual": rng.choice(classes, 40), "predicted": rng.choice(classes, 40),
    })
    s = summarize(pred, classes, confidence=0.9)
    uas = [f["ua"] for f in s["folds"]]
    lo, hi = stats.t.interval(0.9, 3, loc=np.mean(uas), scale=stats.sem(uas))
    assert np.isclose(s["ua_ci_low"], lo) and np.isclose(s["ua_ci_high"], hi) and s["confidence"] == 0.9
    one = summarize(pred[pred["fold"] == 0], classes)
    assert one["ua_ci_low"] is None and one["ua_ci_high"] is None and one["confidence"] == 0.95


def write_scored_fold(tmp_path, utt_ids):
    """A feature-store index of two speakers and fold 0's scored test speaker `s1`."""
    from mdser.stores import INDEX_FILE, TEST_PROBABILITIES_FILE

    store, models = tmp_path / "features", tmp_path / "models"
    store.mkdir()
    pd.DataFrame({"utt_id": ["a1", "a2", "b1"], "speaker": ["s1", "s1", "s2"],
                  "emotion": ["x", "y", "x"], "offset": [0, 10, 20], "frames": [10, 10, 10]}
                 ).to_csv(store / INDEX_FILE, index=False)
    (models / "fold_0").mkdir(parents=True)
    pd.DataFrame({"utt_id": utt_ids, "x": [0.9, 0.2], "y": [0.1, 0.8]}).to_csv(
        models / "fold_0" / TEST_PROBABILITIES_FILE, index=False)
    folds_doc = {"classes": ["x", "y"], "folds": [{"fold": 0, "train": ["s2"], "val": "s2", "test": "s1"}]}
    return store, folds_doc, models


def test_test_predictions_are_the_scores_train_wrote(tmp_path):
    from mdser.evaluation import test_predictions

    store, folds_doc, models = write_scored_fold(tmp_path, ["a1", "a2"])
    got = test_predictions({"train": {"folds": 1}}, store, folds_doc, models)
    assert list(got["utt_id"]) == ["a1", "a2"] and list(got["speaker"]) == ["s1", "s1"]
    assert list(got["actual"]) == ["x", "y"] and list(got["predicted"]) == ["x", "y"]
    assert list(got["p_x"]) == pytest.approx([0.9, 0.2])


def test_scores_of_other_utterances_are_stale_models(tmp_path):
    from mdser.errors import UserError
    from mdser.evaluation import test_predictions

    store, folds_doc, models = write_scored_fold(tmp_path, ["a1", "b1"])
    with pytest.raises(UserError, match="test_probabilities.csv: not the test utterances 's1'"):
        test_predictions({"train": {"folds": 1}}, store, folds_doc, models)
