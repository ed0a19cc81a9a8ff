"""The built-in corpus: determinism, counts, durations, layouts, and a separability check."""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdser.audio import read_audio, resample
from mdser.corpora import class_names, prepare
from mdser.corpora.synth import EMODB_COUNTS, class_counts, generate

SYNTH = {"seed": 0, "speakers": 10, "utterances": 240, "sample_rate": 22050, "layout": "emodb"}
IEMOCAP = {"root": "", "classes": ["neu", "hap", "sad", "ang"],
           "merge_exc_into_hap": False, "include_scripted": False}


def data(**synth) -> dict:
    return {"corpus": "synth", "min_duration": 0.5, "synth": {**SYNTH, **synth},
            "iemocap": IEMOCAP}


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    raw = tmp_path_factory.mktemp("synth")
    start = time.perf_counter()
    df, _ = prepare(data(), raw)
    seconds = time.perf_counter() - start
    print(f"\nsynth default corpus: {len(df)} utterances prepared in {seconds:.1f} s")
    return raw, df


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    small = {**SYNTH, "utterances": 21, "speakers": 3}
    generate(tmp_path / "a", small)
    generate(tmp_path / "b", small)
    generate(tmp_path / "c", {**small, "seed": 1})
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 22 and a == b  # 21 wavs + speakers.csv
    assert set(a) != set(c) or all(a[k] != c[k] for k in a if k.endswith(".wav"))
    # regenerating into the same folder replaces the old corpus completely
    generate(tmp_path / "a", {**small, "utterances": 14})
    assert len(list((tmp_path / "a" / "wav").glob("*.wav"))) == 14


def test_class_counts_follow_emodb():
    assert class_counts(535, EMODB_COUNTS) == EMODB_COUNTS
    counts = class_counts(240, EMODB_COUNTS)
    assert sum(counts.values()) == 240 and max(counts, key=counts.get) == "anger"


def test_default_corpus(default_corpus):
    raw, df = default_corpus
    assert len(df) == 240 and (df["status"] == "kept").all()
    counts = df["emotion"].value_counts().to_dict()
    assert counts == class_counts(240, EMODB_COUNTS)
    assert sorted(df["speaker"].unique()) == ["03", "08", "09", "10", "11", "12", "13", "14",
                                              "15", "16"]
    assert df.groupby("speaker")["gender"].first().value_counts().to_dict() == {"m": 5, "f": 5}
    assert (df["sample_rate"] == 22050).all() and (df["channels"] == 1).all()
    lo, hi = df["duration"].min(), df["duration"].max()
    print(f"\nsynth durations: {lo:.2f} to {hi:.2f} s, mean {df['duration'].mean():.2f} s; "
          f"class counts {dict(sorted(counts.items()))}")
    assert 0.9 <= lo < 1.8 and 4.0 < hi <= 6.0
    assert set(df["emotion"]) == set(class_names(data()))


def test_emotions_move_prosody_as_described(default_corpus):
    """Louder anger than sadness, higher F0 in fear than in boredom (per-speaker medians)."""
    raw, df = default_corpus
    df = df[df["speaker"].isin(["03", "08"])]
    level, pitch = {}, {}
    for row in df.itertuples():
        y, sr = read_audio(raw / row.path)
        y = y[:, 0]
        level.setdefault(row.emotion, []).append(20 * np.log10(np.sqrt(np.mean(y**2))))
        spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        freqs = np.fft.rfftfreq(len(y), 1 / sr)
        band = (freqs > 60) & (freqs < 500)
        centroid = np.sum(spec[band] * freqs[band]) / spec[band].sum()
        pitch.setdefault(row.emotion, []).append(centroid)
    med = {k: np.median(v) for k, v in level.items()}
    assert med["anger"] > med["neutral"] > med["sadness"]
    assert np.median(pitch["fear"]) > np.median(pitch["boredom"])


def logmel_stats(path: Path) -> np.ndarray:
    import librosa

    y, sr = read_audio(path)
    y = resample(y, sr, 16000)
    mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=160, n_mels=40)
    logmel = np.log(mel + 1e-8)
    return np.concatenate([logmel.mean(axis=1), logmel.std(axis=1)])


def test_simple_baseline_beats_chance_but_is_far_from_perfect(default_corpus):
    """Logistic regression on utterance mean/std log-mel, speaker-independent (2 test speakers
    per fold, 5 folds): clearly above chance (1/7), clearly below 100 %."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    raw, df = default_corpus
    x = np.stack([logmel_stats(raw / p) for p in df["path"]])
    y, spk = df["emotion"].to_numpy(), df["speaker"].to_numpy()
    speakers = sorted(set(spk))
    uas = []
    for fold in range(5):
        test = np.isin(spk, speakers[2 * fold: 2 * fold + 2])
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        model.fit(x[~test], y[~test])
        pred = model.predict(x[test])
        uas.append(np.mean([np.mean(pred[y[test] == c] == c) for c in set(y[test])]))
    ua = float(np.mean(uas))
    print(f"\nsynth baseline (logreg on log-mel mean/std, leave-2-speakers-out): "
          f"UA per fold {np.round(uas, 3).tolist()}, mean {ua:.3f} (chance {1 / 7:.3f})")
    assert 2 / 7 < ua < 0.8


def test_generator_parameters_are_the_rendered_ones_and_nearly_separate_the_emotions(default_corpus):
    """`ceiling.generator_parameters` re-draws what each file was rendered from: its level
    parameter predicts the file's measured RMS level. From those parameters, leave-one-
    speaker-out logistic regression separates the emotions almost perfectly (the corpus's
    ceiling); with the emotions shuffled the same procedure stays near chance."""
    from mdser.ceiling import (
        PARAMETERS,
        ceiling,
        generator_parameters,
        leave_one_speaker_out_ua,
        speaker_standardized,
    )
    from mdser.corpora.synth import _emodb_name, plan

    raw, df = default_corpus
    x, emotions, speakers = generator_parameters(SYNTH)
    items = plan(SYNTH)
    names = [_emodb_name(item) for item in items]
    assert emotions == [item["emotion"] for item in items]
    path_of = {Path(p).stem: p for p in df["path"]}
    rms_db = [20 * np.log10(np.sqrt(np.mean(read_audio(raw / path_of[n])[0][:, 0] ** 2))) for n in names]
    # within each (speaker, emotion): what the utterance's own draw adds to its level
    # (a draw from another seed leaves no correlation)
    level = pd.DataFrame({"draw": x[:, PARAMETERS.index("level_db")], "rms_db": rms_db,
                          "group": [f"{s}-{e}" for s, e in zip(speakers, emotions, strict=True)]})
    own = level[["draw", "rms_db"]] - level.groupby("group")[["draw", "rms_db"]].transform("mean")
    assert own.corr().iloc[0, 1] > 0.6

    uas = ceiling(SYNTH)
    assert np.mean(uas["all parameters"]) > 0.85
    shuffled = list(np.random.default_rng(0).permutation(emotions))
    chance = leave_one_speaker_out_ua(speaker_standardized(x, speakers), shuffled, speakers)
    assert np.mean(chance) < 0.3


def test_the_baseline_features_carry_level_and_f0_but_not_jitter_or_shimmer(default_corpus):
    """`ceiling.recoverability` from the baseline's statistics of the pipeline's own
    features: the utterance level and F0 are predicted well on held-out speakers, the
    cycle-to-cycle jitter and shimmer not at all (R^2 near 0)."""
    from helpers import repo_params

    from mdser.baseline import utterance_statistics
    from mdser.ceiling import PARAMETERS, generator_parameters, recoverability
    from mdser.corpora.synth import _emodb_name, plan
    from mdser.features import input_frames, three_channel

    raw, df = default_corpus
    params, _, speakers_of = generator_parameters(SYNTH)
    path_of = {Path(p).stem: p for p in df["path"]}
    maps = []
    for item in plan(SYNTH):
        y, sr = read_audio(raw / path_of[_emodb_name(item)])
        maps.append(three_channel(resample(y[:, 0], sr, 16000), 16000, repo_params()["features"]))
    rows = pd.DataFrame({"speaker": speakers_of, "frames": [len(m) for m in maps]})
    rows["offset"] = np.cumsum(rows["frames"]) - rows["frames"]
    stats = utterance_statistics(input_frames(np.concatenate(maps), rows, "speaker"), rows)
    r2 = recoverability(stats, params, speakers_of)
    assert r2["level_db"] > 0.8 and r2["f0_hz"] > 0.6, r2
    assert abs(r2["jitter"]) < 0.2 and abs(r2["shimmer"]) < 0.2, r2
    assert set(r2) == set(PARAMETERS)


def test_iemocap_layout_is_read_by_the_iemocap_reader(tmp_path):
    d = data(layout="iemocap", utterances=80)
    df, _ = prepare(d, tmp_path)
    assert (tmp_path / "IEMOCAP_full_release" / "Session5" / "dialog" / "EmoEvaluation").is_dir()
    assert len(df) == 80 and (df["status"] == "kept").all()
    assert set(df["emotion"]) == set(class_names(d)) == {"neutral", "happiness", "sadness", "anger"}
    assert sorted(df["speaker"].unique()) == [f"Ses{s:02d}{g}" for s in range(1, 6) for g in "FM"]
    # both speakers speak in each dialog: the dialog letter is not the speaker's
    dialog_letter = df["utt_id"].str[5]
    assert (dialog_letter != df["speaker"].str[-1]).any()
    assert df["path"].str.startswith("IEMOCAP_full_release/Session").all()

