"""The baseline row on a tiny synthetic feature store: statistics, C selection, no test
speaker in any fit, evaluate's output formats, determinism."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mdser import baseline
from mdser.splits import fold_members, speaker_folds
from mdser.stores import FEATURES_FILE, INDEX_FILE, sha256_file, write_index, write_meta

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["anger", "neutral", "sadness"]
SPEAKERS = ["s0", "s1", "s2", "s3"]
N_MELS = 6
PARAMS = {"train": {"folds": 4, "standardize": "train"},
          "baseline": {"C": [10.0, 0.01, 1.0, 0.1], "max_iter": 2000}}


def build_store(out: Path, seed: int = 0, per_class: int = 5) -> None:
    """4 speakers x 3 classes x `per_class` utterances of 15-40 frames; class c raises band c
    in all 3 channels by 3 (separable), each speaker shifts every band a little."""
    rng = np.random.default_rng(seed)
    rows, chunks, offset = [], [], 0
    for s, speaker in enumerate(SPEAKERS):
        for c, emotion in enumerate(CLASSES):
            for u in range(per_class):
                n = int(rng.integers(15, 41))
                x = rng.normal(0.2 * s, 1.0, (n, N_MELS, 3)).astype(np.float32)
                x[:, c, :] += 3.0
                chunks.append(x)
                rows.append({"utt_id": f"{speaker}_{emotion}_{u}", "speaker": speaker, "emotion": emotion,
                             "offset": offset, "frames": n})
                offset += n
    out.mkdir(parents=True)
    np.save(out / FEATURES_FILE, np.concatenate(chunks), allow_pickle=False)
    write_index(pd.DataFrame(rows), out / INDEX_FILE)
    write_meta(out, {"manifest_sha256": "m", "index_sha256": sha256_file(out / INDEX_FILE)})


def folds_doc() -> dict:
    manifest = pd.DataFrame({"speaker": SPEAKERS, "status": "kept", "session": None})
    return {"manifest_sha256": "m", "classes": CLASSES, "folds": speaker_folds(manifest)}


@pytest.fixture
def store(tmp_path) -> Path:
    build_store(tmp_path / "features")
    return tmp_path / "features"


def test_utterance_statistics_are_per_band_mean_and_std_over_time():
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(50, 4, 3)).astype(np.float32)
    rows = pd.DataFrame({"offset": [0, 10, 35], "frames": [10, 25, 15]})
    stats = baseline.utterance_statistics(frames, rows)
    assert stats.shape == (3, 2 * 4 * 3)
    for i, (o, n) in enumerate([(0, 10), (10, 25), (35, 15)]):
        x = frames[o : o + n].astype(np.float64)
        for band in range(4):
            for ch in range(3):
                k = band * 3 + ch
                assert stats[i, k] == pytest.approx(np.mean(x[:, band, ch]), abs=1e-12)
                assert stats[i, 12 + k] == pytest.approx(np.std(x[:, band, ch]), abs=1e-12)


def test_c_is_chosen_on_the_validation_speaker_and_ties_go_to_the_smaller_c():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 4)) + 5 * np.eye(3, 4)[y]  # far apart: every C classifies perfectly
    model, c, val_ua = baseline.fit_fold(x, y, x, y, [1.0, 0.01, 10.0], 500, 3)
    assert val_ua == {0.01: 1.0, 1.0: 1.0, 10.0: 1.0} and c == 0.01 and model.C == 0.01
    # a validation set on which the labels of two classes are swapped: only a weak fit scores
    noisy = rng.normal(size=(60, 4)) + 0.3 * np.eye(3, 4)[y]
    model, c, val_ua = baseline.fit_fold(noisy, y, noisy, y, [0.001, 100.0], 500, 3)
    assert c == max(val_ua, key=lambda k: (val_ua[k], -k))


def test_a_tie_up_to_float_noise_goes_to_the_smaller_c(monkeypatch):
    """UA 0.5 reached as (1 + 0) / 2 by one C and as (0.3 + 0.7) / 2 by another."""
    scores = iter([0.49999999999999994, 0.5])
    monkeypatch.setattr(baseline, "unweighted_accuracy", lambda y, p: next(scores))
    x, y = np.eye(3)[[0, 1, 2, 0, 1, 2]], np.array([0, 1, 2, 0, 1, 2])
    _, c, val_ua = baseline.fit_fold(x, y, x, y, [1.0, 0.1], 100, 3)
    assert c == 0.1 and val_ua == {0.1: 0.49999999999999994, 1.0: 0.5}


def test_a_class_missing_from_training_gets_probability_zero():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 2], 10)
    x = rng.normal(size=(20, 3)) + 4 * np.eye(3)[y]
    model, _, _ = baseline.fit_fold(x, y, x, y, [1.0], 500, 3)
    probs = baseline.class_probabilities(model, x, 3)
    assert probs.shape == (20, 3) and (probs[:, 1] == 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_baseline_separates_the_synthetic_classes_in_evaluate_format(store):
    predictions, selection = baseline.baseline_predictions(PARAMS, store, folds_doc())
    assert list(predictions.columns) == ["fold", "utt_id", "speaker", "actual", "predicted",
                                         *(f"p_{c}" for c in CLASSES)]
    folds = folds_doc()["folds"]
    for f in folds:
        part = predictions[predictions["fold"] == f["fold"]]
        assert set(part["speaker"]) == {f["test"]} and len(part) == 15
        ua = np.mean([np.mean(part["predicted"][part["actual"] == c] == c) for c in CLASSES])
        assert ua >= 0.9
    np.testing.assert_allclose(predictions[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    assert [s["fold"] for s in selection] == [0, 1, 2, 3]
    for s in selection:
        assert s["C"] in PARAMS["baseline"]["C"] and set(s["val_ua"]) == {"0.01", "0.1", "1.0", "10.0"}
        assert s["val_ua"][str(s["C"])] == max(s["val_ua"].values())


def test_only_the_first_train_folds_folds_are_run(store):
    predictions, selection = baseline.baseline_predictions(
        PARAMS | {"train": {"folds": 2, "standardize": "train"}}, store, folds_doc())
    assert sorted(predictions["fold"].unique()) == [0, 1] and len(selection) == 2


def test_the_test_speaker_is_never_fitted_on(store, monkeypatch):
    """A spy on every scaler and classifier fit: only the fold's training speakers."""
    from mdser.stores import open_features

    index, frames = open_features(store)
    stats = baseline.utterance_statistics(frames, index)
    scaled, fitted = [], []
    real_standardizer, real_classifier = baseline.standardizer, baseline.classifier

    def spy_standardizer(x):
        scaled.append(np.array(x))
        return real_standardizer(x)

    def spy_classifier(c, max_iter):
        model = real_classifier(c, max_iter)
        fit = model.fit
        model.fit = lambda x, y: (fitted.append(np.array(x)), fit(x, y))[1]
        return model

    monkeypatch.setattr(baseline, "standardizer", spy_standardizer)
    monkeypatch.setattr(baseline, "classifier", spy_classifier)
    baseline.baseline_predictions(PARAMS, store, folds_doc())
    folds = folds_doc()["folds"]
    assert len(scaled) == 4 and len(fitted) == 4 * len(PARAMS["baseline"]["C"])
    for k, f in enumerate(folds):
        members = fold_members(index, f)
        assert set(members["train"]["speaker"]) == set(f["train"]) and f["test"] not in f["train"]
        np.testing.assert_array_equal(scaled[k], stats[members["train"].index])
        test_rows = {r.tobytes() for r in stats[members["test"].index]}
        assert not test_rows & {r.tobytes() for r in scaled[k]}
        for x in fitted[4 * k : 4 * k + 4]:
            assert len(x) == len(members["train"])


def test_changing_the_test_speaker_changes_nothing_but_its_predictions(tmp_path, store):
    """The test speaker's frames replaced by noise: the same C and validation UAs."""
    other = tmp_path / "other"
    shutil.copytree(store, other)
    index = pd.read_csv(other / INDEX_FILE)
    frames = np.load(other / FEATURES_FILE)
    test = folds_doc()["folds"][0]["test"]
    for r in index[index["speaker"] == test].itertuples():
        frames[r.offset : r.offset + r.frames] = np.random.default_rng(r.Index).normal(
            0, 5, (r.frames, N_MELS, 3))
    np.save(other / FEATURES_FILE, frames, allow_pickle=False)
    one = PARAMS | {"train": {"folds": 1, "standardize": "train"}}
    p1, s1 = baseline.baseline_predictions(one, store, folds_doc())
    p2, s2 = baseline.baseline_predictions(one, other, folds_doc())
    assert s1 == s2
    assert not p1["p_anger"].equals(p2["p_anger"])


def test_global_standardisation_uses_every_utterance(store, monkeypatch):
    scaled = []
    real = baseline.standardizer
    monkeypatch.setattr(baseline, "standardizer", lambda x: (scaled.append(len(x)), real(x))[1])
    baseline.baseline_predictions(PARAMS | {"train": {"folds": 1, "standardize": "global"}},
                                  store, folds_doc())
    assert scaled == [60]


def test_baseline_predictions_are_deterministic(store):
    p1, s1 = baseline.baseline_predictions(PARAMS, store, folds_doc())
    p2, s2 = baseline.baseline_predictions(PARAMS, store, folds_doc())
    assert p1.to_csv(index=False) == p2.to_csv(index=False) and s1 == s2


def run_stage_in_process(monkeypatch, cwd: Path, script: str, *args: str) -> None:
    """A stage's main() in this process (its imports are paid once), from `cwd`."""
    module = runpy.run_path(str(ROOT / "stages" / script), run_name="stage")
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", [script, *args])
    module["main"]()


def test_the_stage_writes_evaluate_formats_byte_identically(
    tmp_path, store, monkeypatch, capsys,
):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["folds"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "splits.json").write_text(json.dumps(folds_doc()))
    shutil.copytree(store, tmp_path / "data" / "features")
    outputs = ["results/baseline/predictions.csv", "results/baseline/summary.json",
               "results/baseline/selection.json", "results/baseline/run.json",
               "metrics/rows/baseline.json"]
    runs = []
    for _ in range(2):
        run_stage_in_process(monkeypatch, tmp_path, "baseline.py", "data/features", "data/splits.json",
                             "results/baseline", "metrics/rows/baseline.json")
        runs.append({p: (tmp_path / p).read_bytes() for p in outputs})
    assert runs[0] == runs[1]
    assert "baseline: test UA" in capsys.readouterr().out

    summary = json.loads(runs[0]["results/baseline/summary.json"])
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2] and summary["ua_mean"] >= 0.9
    assert summary["ua_ci_low"] <= summary["ua_mean"] <= summary["ua_ci_high"]
    assert summary["confidence"] == params["ablation"]["confidence"]
    row = json.loads(runs[0]["metrics/rows/baseline.json"])
    assert set(row) == {"ua_mean", "ua_std", "wa_mean", "wa_std", "pooled_ua", "folds"}
    predictions = pd.read_csv(tmp_path / "results/baseline/predictions.csv")
    assert list(predictions.columns[:5]) == ["fold", "utt_id", "speaker", "actual", "predicted"]

    run = json.loads(runs[0]["results/baseline/run.json"])  # what ablate logs to MLflow
    assert run["stage"] == "baseline" and run["artifacts"] == ["selection.json"]
    assert run["fold_params"] == {str(s["fold"]): {"C": str(s["C"])}
                                  for s in json.loads(runs[0]["results/baseline/selection.json"])}
    assert not (tmp_path / "mlruns").exists()  # the stage itself logs nothing
