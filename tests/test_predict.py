"""`mdser predict`: files of any rate and channel count through the pipeline's audio path,
the row's fold ensemble, one error line per bad file.

The models are the real `train_row` output on a tiny built-in corpus (4 speakers, 2 folds,
1 epoch, 4 filters), built by the library functions the stages call.
"""

import json
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import soxr
import yaml

from mdser import cli
from mdser.errors import UserError
from mdser.features import speaker_standardized
from mdser.params import load_params, row_model
from mdser.predict import best_row, classify, file_features, fold_probabilities, load_row

ROW = "cnn-gmp-softmax"


def tiny_params() -> dict:
    """The tiny configuration (4 speakers, 1 epoch, 20 bands), validated by the schema."""
    return helpers.tiny_params({"data": {"synth": {"speakers": 4}}, "features": {"n_mels": 20},
                                "train": {"max_epochs": 1, "select_at": "epoch", "patience": 0,
                                          "lr_policy": "fixed"},
                                "runtime": {"workers": 1}}, validate=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repository root with params.yaml, data/features, data/splits.json and models/<ROW>."""
    from mdser.corpora import class_names, prepare, write_manifest
    from mdser.features import build_feature_store
    from mdser.row_training import train_row
    from mdser.splits import read_folds, speaker_folds, write_folds
    from mdser.stores import build_audio_store, sha256_file, write_meta

    root = tmp_path_factory.mktemp("repo")
    params = tiny_params()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    data = root / "data"
    manifest, _ = prepare(params["data"], data / "raw")
    write_manifest(manifest, data / "manifest.csv")
    (data / "audio").mkdir()
    build_audio_store(manifest, data / "raw", data / "audio", params["audio"]["sample_rate"])
    write_meta(data / "audio", {"sample_rate": params["audio"]["sample_rate"],
                                "manifest_sha256": sha256_file(data / "manifest.csv")})
    build_feature_store(data / "audio", data / "features", params["features"])
    kept = set(manifest.loc[manifest["status"] == "kept", "emotion"])
    classes = [c for c in class_names(params["data"]) if c in kept]
    write_folds(speaker_folds(manifest), sha256_file(data / "manifest.csv"), data / "splits.json", classes)
    train_row(params, ROW, row_model(params, ROW), data / "features", read_folds(data / "splits.json"),
              root / "models" / ROW, root / ".cache" / "resume" / ROW)
    return root


def store_utterance(root: Path, i: int) -> tuple[np.ndarray, pd.Series]:
    """Utterance `i` of the audio store (16 kHz mono float32) and its index row."""
    from mdser.stores import open_audio

    index, samples = open_audio(root / "data" / "audio")
    r = index.iloc[i]
    return np.array(samples[r.sample_offset : r.sample_offset + r.n_samples]), r


def test_predict_classifies_a_stereo_44k_and_a_mono_16k_file_and_names_each_bad_one(
        repo, tmp_path, monkeypatch, capsys):
    y, _ = store_utterance(repo, 0)
    stereo = tmp_path / "stereo44k.wav"
    y44 = soxr.resample(y, 16000, 44100)
    sf.write(stereo, np.stack([y44, 0.5 * y44], axis=1), 44100, subtype="PCM_16")
    mono = tmp_path / "mono16k.flac"
    sf.write(mono, store_utterance(repo, 1)[0], 16000, subtype="PCM_16")
    text = tmp_path / "notes.wav"
    text.write_text("not audio\n")
    short = tmp_path / "short.wav"
    sf.write(short, y[:1600], 16000)  # 0.1 s < data.min_duration
    missing = tmp_path / "missing.wav"
    monkeypatch.chdir(repo)

    with pytest.raises(SystemExit) as stop:
        cli.main(["predict", "--row", ROW, str(stereo), str(text), str(mono), str(missing), str(short)])
    assert stop.value.code == 1
    out, err = capsys.readouterr()
    errors = err.strip().splitlines()
    assert len(errors) == 3
    for path, reason in ((text, "unreadable"), (missing, "unreadable"), (short, "too_short")):
        assert sum(str(path) in line and reason in line for line in errors) == 1, errors
    lines = out.strip().splitlines()
    assert lines[0] == (f"row {ROW}, ensemble of folds [0, 1]; the 2 file(s) normalised together as "
                        "one speaker")
    assert [line.split()[0] for line in lines[2:]] == [str(stereo), str(mono)]

    cli.main(["predict", "--row", ROW, "--json", str(stereo), str(mono)])
    results = json.loads(capsys.readouterr().out)
    classes = json.loads((repo / "data" / "splits.json").read_text())["classes"]
    for r in results:
        assert list(r["probabilities"]) == classes
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["emotion"] == max(classes, key=r["probabilities"].get)


def test_each_fold_gives_what_evaluate_gives_and_the_row_their_mean(repo, tmp_path, monkeypatch):
    """A test speaker's store utterances written as 16 kHz float wavs and classified in one
    call (one speaker's recordings, normalised together as `train.standardize: speaker`
    normalised that speaker): every fold model's probabilities equal evaluate's test
    predictions for them (where that fold tests their speaker)."""
    from mdser.evaluation import test_predictions
    from mdser.splits import read_folds

    monkeypatch.chdir(repo)
    params = load_params("params.yaml")
    assert params["train"]["standardize"] == "speaker"
    folds_doc = read_folds(Path("data/splits.json"))
    evaluated = test_predictions(params, Path("data/features"), folds_doc, Path("models") / ROW)
    models = load_row(params, ROW, Path("models") / ROW, Path("data/splits.json"))
    index = pd.read_csv("data/audio/index.csv")
    for fold in (0, 1):
        tested = evaluated[evaluated["fold"] == fold]
        paths = []
        for utt_id in tested["utt_id"]:
            y, _ = store_utterance(repo, int(np.flatnonzero(index["utt_id"] == utt_id)[0]))
            paths.append(tmp_path / f"{utt_id}.wav")
            sf.write(paths[-1], y, 16000, subtype="FLOAT")
        features = [file_features(path, params) for path in paths]
        lengths = np.array([len(x) for x in features])
        rows = pd.DataFrame({"offset": np.concatenate([[0], np.cumsum(lengths)[:-1]]), "frames": lengths,
                             "speaker": "s"})
        frames = speaker_standardized(np.concatenate(features), rows)
        per_fold = fold_probabilities(params, models, frames, rows)
        want = tested[[f"p_{c}" for c in models.classes]].to_numpy(float)
        np.testing.assert_allclose(per_fold[fold], want, atol=2e-6)
        results, errors = classify(paths, params, models)
        assert not errors
        np.testing.assert_allclose([list(r["probabilities"].values()) for r in results],
                                   per_fold.mean(axis=0), atol=1e-6)


def test_best_row_is_the_highest_mean_ua_of_both_tables_without_the_baseline(tmp_path):
    table = tmp_path / "ablation.json"
    table.write_text(json.dumps({
        "table1": {"baseline": {"ua_mean": 90.0}, "a": {"ua_mean": 30.0}, "b": {"ua_mean": 31.0}},
        "table3": {"c": {"ua_mean": 32.5}, "a": {"ua_mean": 30.0}},
        "steps": {"c": {"delta_ua": 50.0}},
    }))
    assert best_row(table) == "c"
    with pytest.raises(UserError, match="missing"):
        best_row(tmp_path / "none.json")
