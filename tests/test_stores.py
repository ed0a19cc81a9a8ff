"""Ragged stores: atomic writes, checksum verification, refusing a damaged store."""

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from mdser.errors import UserError
from mdser.features import build_feature_store, n_frames
from mdser.stores import (
    atomic_dir,
    build_audio_store,
    open_audio,
    open_features,
    sha256_file,
    write_meta,
)

FEATURES = {"n_mels": 40, "n_fft": 512, "win_ms": 25, "hop_ms": 10, "delta_n": 9}


@pytest.fixture
def corpus(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (sr, seconds, channels) in enumerate([(22050, 1.0, 1), (44100, 0.7, 2), (16000, 1.3, 1)]):
        y = (0.1 * rng.standard_normal((int(sr * seconds), channels))).astype(np.float32)
        name = f"u{i}.wav"
        sf.write(raw / name, y, sr, subtype="PCM_16")
        rows.append({"utt_id": f"u{i}", "path": name, "speaker": f"s{i}", "emotion": "anger",
                     "status": "kept", "sha256": sha256_file(raw / name), "seconds": seconds})
    return raw, pd.DataFrame(rows)


def test_audio_and_feature_stores_round_trip(tmp_path, corpus):
    raw, manifest = corpus
    audio = tmp_path / "audio"
    with atomic_dir(audio) as out:
        build_audio_store(manifest, raw, out, 16000)
        write_meta(out, {"sample_rate": 16000, "manifest_sha256": "x"})
    index, samples = open_audio(audio)
    assert list(index["utt_id"]) == ["u0", "u1", "u2"]
    np.testing.assert_allclose(index["n_samples"], (manifest["seconds"] * 16000).round(), atol=1)
    feats = tmp_path / "features"
    with atomic_dir(feats) as out:
        build_feature_store(audio, out, FEATURES)
    findex, frames = open_features(feats)
    assert list(findex["frames"]) == [n_frames(int(n), 160) for n in index["n_samples"]]
    assert frames.shape == (findex["frames"].sum(), 40, 3) and np.isfinite(frames).all()


def test_stores_built_by_worker_processes_equal_the_one_utterance_computation(
    tmp_path, corpus, monkeypatch
):
    # jobs of 2 utterances: the 3 files go to two workers, two part files, two feature jobs
    from threadpoolctl import threadpool_limits

    import mdser.features
    import mdser.stores
    from mdser import audio as audio_io
    from mdser.features import three_channel

    monkeypatch.setattr(mdser.stores, "UTTERANCES_PER_JOB", 2)
    monkeypatch.setattr(mdser.features, "UTTERANCES_PER_JOB", 2)
    raw, manifest = corpus
    audio = tmp_path / "audio"
    with atomic_dir(audio) as out:
        build_audio_store(manifest, raw, out, 16000)
        write_meta(out, {"sample_rate": 16000, "manifest_sha256": "x"})
    assert sorted(p.name for p in audio.iterdir()) == ["audio.f32", "index.csv", "meta.json"]
    with atomic_dir(tmp_path / "features") as out:
        build_feature_store(audio, out, FEATURES)
    index, samples = open_audio(audio)
    findex, frames = open_features(tmp_path / "features")
    for r, f in zip(index.itertuples(), findex.itertuples(), strict=True):
        y, sr = audio_io.read_audio(raw / f"{r.utt_id}.wav")
        expected = audio_io.resample(y, sr, 16000)
        got = samples[r.sample_offset : r.sample_offset + r.n_samples]
        np.testing.assert_array_equal(got, expected)
        with threadpool_limits(1):  # as in the workers: BLAS threads change float rounding
            reference = three_channel(expected, 16000, FEATURES)
        np.testing.assert_array_equal(frames[f.offset : f.offset + f.frames], reference)


def test_a_corpus_file_changed_after_download_is_detected(tmp_path, corpus):
    raw, manifest = corpus
    with open(raw / "u1.wav", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match=r"u1\.wav.*changed since `download`"):
        with atomic_dir(tmp_path / "audio") as out:
            build_audio_store(manifest, raw, out, 16000)
    assert not (tmp_path / "audio").exists()  # nothing that looks finished


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "a").write_text("first")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as d:
            (d / "a").write_text("half")
            raise KeyboardInterrupt
    assert (out / "a").read_text() == "first"
    assert not list(tmp_path.glob("*.partial"))


def test_a_damaged_feature_store_is_refused(tmp_path, corpus):
    raw, manifest = corpus
    audio, feats = tmp_path / "audio", tmp_path / "features"
    with atomic_dir(audio) as out:
        build_audio_store(manifest, raw, out, 16000)
        write_meta(out, {"sample_rate": 16000, "manifest_sha256": "x"})
    with atomic_dir(feats) as out:
        build_feature_store(audio, out, FEATURES)
    index = pd.read_csv(feats / "index.csv")
    index.loc[0, "frames"] += 5
    index.to_csv(feats / "index.csv", index=False)
    with pytest.raises(UserError, match="damaged"):
        open_features(feats)
