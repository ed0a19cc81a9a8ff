"""EMODB reader: file-name parsing, genders, bad inputs, and the real corpus when present."""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import make_emodb, utterance

from mdser.corpora import prepare, resolve_path
from mdser.corpora.emodb import EMOTION_LETTERS, SPEAKER_GENDERS, parse_name, read_emodb
from mdser.errors import UserError
from mdser.stores import build_audio_store


def test_parse_name():
    assert parse_name("03a01Fa") == {"speaker": "03", "text": "a01", "emotion": "F", "version": "a"}
    assert parse_name("16b10Lb")["emotion"] == "L"
    for bad in ("3a01Fa", "03a01F", "03a01Faa", "README", "03A01Fa"):
        assert parse_name(bad) is None


def test_letters_and_genders_are_the_documented_ones():
    assert EMOTION_LETTERS == {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear",
                               "F": "happiness", "T": "sadness", "N": "neutral"}
    assert {s for s, g in SPEAKER_GENDERS.items() if g == "f"} == {"08", "09", "13", "14", "16"}
    assert {s for s, g in SPEAKER_GENDERS.items() if g == "m"} == {"03", "10", "11", "12", "15"}


def test_clean_corpus_all_kept(tmp_path):
    make_emodb(tmp_path)
    df = read_emodb(tmp_path, "emodb", min_duration=0.5)
    assert len(df) == 14 and (df["status"] == "kept").all()
    row = df.set_index("utt_id").loc["03a01Wa"]
    assert (row.speaker, row.gender, row.emotion) == ("03", "m", "anger")
    assert row.path == "wav/03a01Wa.wav"
    assert row.sample_rate == 16000 and row.channels == 1 and row.duration == pytest.approx(0.7)
    assert len(row.sha256) == 64
    assert df.set_index("utt_id").loc["08a01Wa"].gender == "f"
    assert set(df["emotion"]) == set(EMOTION_LETTERS.values())


def test_bad_inputs_each_get_a_row_and_a_reason(tmp_path):
    make_emodb(tmp_path)
    wav = tmp_path / "wav"
    (wav / "09a01Wa.wav").write_bytes(b"")  # zero bytes
    full = (wav / "03a01Wa.wav").read_bytes()
    (wav / "09a02Wa.wav").write_bytes(full[: len(full) // 2])  # truncated
    sf.write(wav / "09a04Wa.wav", np.zeros(16000), 16000, subtype="PCM_16")  # silence
    y = utterance(1.0, 16000, 7).astype(np.float32)
    y[10] = np.nan
    sf.write(wav / "09a05Wa.wav", y, 16000, subtype="FLOAT")  # NaN
    sf.write(wav / "09a07Wa.wav", utterance(1.0, 44100, 8, channels=2), 44100)  # stereo 44.1k
    sf.write(wav / "09b01Wa.wav", utterance(0.2, 16000, 9), 16000)  # 0.2 s
    sf.write(wav / "09b02Xa.wav", utterance(1.0, 16000, 10), 16000)  # unknown emotion code
    sf.write(wav / "notes.wav", utterance(1.0, 16000, 11), 16000)  # not an EMODB name
    (wav / "09b03Wa.wav").write_bytes(full)  # same audio as 03a01Wa
    (wav / "readme.txt").write_text("not audio")

    df = read_emodb(tmp_path, "emodb", min_duration=0.5).set_index("utt_id")
    expected = {
        "09a01Wa": "unreadable", "09a02Wa": "unreadable", "09a04Wa": "silent",
        "09a05Wa": "nan", "09b01Wa": "too_short", "09b02Xa": "unknown_emotion_code",
        "notes": "bad_file_name", "09b03Wa": "duplicate",
    }
    for utt, reason in expected.items():
        assert (df.loc[utt, "status"], df.loc[utt, "reason"]) == ("dropped", reason), utt
    stereo = df.loc["09a07Wa"]
    assert (stereo.status, stereo.sample_rate, stereo.channels) == ("kept", 44100, 2)
    assert df.loc["03a01Wa", "status"] == "kept"  # the first of the duplicates stays
    assert df.loc["09b01Wa", "duration"] == pytest.approx(0.2)
    # accounting: every wav file appears exactly once, nothing else does
    files = sorted(p.name for p in wav.glob("*.wav"))
    assert sorted(Path(p).name for p in df["path"]) == files
    assert df.index.is_unique
    assert (df["reason"] == "").eq(df["status"] == "kept").all()


def test_speakers_csv_overrides_genders(tmp_path):
    make_emodb(tmp_path, speakers=("03",))
    (tmp_path / "speakers.csv").write_text("speaker,gender\n03,f\n")
    df = read_emodb(tmp_path, "synth", 0.5)
    assert set(df["gender"]) == {"f"} and set(df["corpus"]) == {"synth"}


def test_missing_wav_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no 'wav' folder"):
        read_emodb(tmp_path, "emodb", 0.5)
    (tmp_path / "wav").mkdir()
    with pytest.raises(UserError, match="no .wav files"):
        read_emodb(tmp_path, "emodb", 0.5)


def test_archive_with_top_folder(tmp_path):
    make_emodb(tmp_path / "emodb")
    df = read_emodb(tmp_path, "emodb", 0.5)
    assert len(df) == 14 and df["path"].str.startswith("emodb/wav/").all()


def test_an_unpacked_copy_is_read_in_place_and_checked_by_resample(tmp_path):
    copy = tmp_path / "emodb"
    make_emodb(copy)
    raw = tmp_path / "raw"
    # an unreachable url: with data.emodb.root set, nothing is downloaded
    emodb = {"root": str(copy), "url": "http://127.0.0.1:9/download.zip", "sha256": ""}
    df, info = prepare({"corpus": "emodb", "min_duration": 0.5, "emodb": emodb}, raw)
    assert info["root"] == str(copy) and not raw.exists()  # nothing copied
    reference = read_emodb(copy, "emodb", 0.5)  # as if the copy had been unpacked into raw
    assert df.drop(columns="path").equals(reference.drop(columns="path"))
    assert [resolve_path(p, raw) for p in df["path"]] == [copy / p for p in reference["path"]]
    # the wav folder itself names the same copy
    df_wav, _ = prepare({"corpus": "emodb", "min_duration": 0.5,
                         "emodb": emodb | {"root": str(copy / "wav")}}, raw)
    assert df_wav.equals(df)

    (tmp_path / "audio").mkdir()
    index = build_audio_store(df, raw, tmp_path / "audio", 16000)
    assert len(index) == 14
    changed = copy / "wav" / "03a01Wa.wav"
    changed.write_bytes(changed.read_bytes()[:-2] + b"\x01\x01")
    (tmp_path / "audio2").mkdir()
    with pytest.raises(UserError, match=f"{changed}: its content changed since"):
        build_audio_store(df, raw, tmp_path / "audio2", 16000)


EMODB_COUNTS = {"anger": 127, "boredom": 81, "disgust": 46, "fear": 69,
                "happiness": 71, "sadness": 62, "neutral": 79}


@pytest.mark.skipif(
    not os.environ.get("EMODB_ROOT"),
    reason="real EMODB not present: set EMODB_ROOT to the extracted corpus (the folder "
    "holding wav/) to check its known counts (535 utterances)",
)
def test_real_emodb_counts():
    root = Path(os.environ["EMODB_ROOT"])
    df = read_emodb(root, "emodb", min_duration=0.5)
    kept = df[df["status"] == "kept"]
    assert len(df) == 535, df[df["status"] != "kept"][["utt_id", "reason"]]
    assert len(kept) == 535
    assert kept["emotion"].value_counts().to_dict() == EMODB_COUNTS
    assert sorted(kept["speaker"].unique()) == sorted(SPEAKER_GENDERS)
