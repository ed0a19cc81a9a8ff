"""Manifest round trip, formatting, counts and accounting."""

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_emodb

from mdser.corpora import (
    COLUMNS,
    class_names,
    corpus_counts,
    read_manifest,
    resolve_path,
    write_manifest,
)
from mdser.corpora.emodb import read_emodb
from mdser.corpora.manifest import manifest_path, new_row
from mdser.errors import UserError


def sample() -> pd.DataFrame:
    rows = [
        new_row("emodb", "08a01Fa", "wav/08a01Fa.wav", speaker="08", gender="f",
                emotion="happiness", duration=1.23456789, sample_rate=16000, channels=1,
                sha256="a" * 64),
        new_row("emodb", "03a01Wa", "wav/03a01Wa.wav", speaker="03", gender="m",
                emotion="anger", duration=2.0, sample_rate=16000, channels=1, sha256="b" * 64),
        new_row("emodb", "03a02Wa", "wav/03a02Wa.wav", speaker="03", gender="m",
                emotion="anger", reason="silent"),
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_round_trip_keeps_string_ids_and_sorts(tmp_path):
    path = tmp_path / "m" / "manifest.csv"
    write_manifest(sample(), path)
    df = read_manifest(path)
    assert list(df.columns) == COLUMNS
    assert list(df["utt_id"]) == ["03a01Wa", "03a02Wa", "08a01Fa"]
    assert list(df["speaker"]) == ["03", "03", "08"] and pd.api.types.is_string_dtype(df["speaker"])
    assert df.loc[2, "duration"] == pytest.approx(1.234568)
    assert df.loc[1, "status"] == "dropped" and df.loc[1, "reason"] == "silent"
    assert df.loc[0, "session"] == "" and df["sample_rate"].dtype.kind == "i"


def test_written_bytes_are_deterministic(tmp_path):
    write_manifest(sample(), tmp_path / "a.csv")
    write_manifest(sample().iloc[::-1], tmp_path / "b.csv")
    a = (tmp_path / "a.csv").read_bytes()
    assert a == (tmp_path / "b.csv").read_bytes()
    assert b"\r" not in a and b"1.234568" in a and b"2.000000" in a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]  # no temp left


def test_read_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("corpus,utt_id\nemodb,x\n")
    with pytest.raises(UserError, match="lacks columns"):
        read_manifest(tmp_path / "bad.csv")


def test_paths_relative_under_raw_dir_absolute_elsewhere(tmp_path):
    raw = tmp_path / "raw"
    assert manifest_path(raw / "wav" / "x.wav", raw) == "wav/x.wav"
    outside = tmp_path / "corpus" / "y.wav"
    assert manifest_path(outside, raw) == outside.as_posix()
    assert resolve_path("wav/x.wav", raw) == raw / "wav" / "x.wav"
    assert resolve_path(outside.as_posix(), raw) == outside


def test_corpus_counts_json(tmp_path):
    counts = corpus_counts(sample())
    assert counts["files"] == 3 and counts["kept"] == 2 and counts["dropped"] == 1
    assert counts["dropped_by_reason"] == {"silent": 1}
    assert counts["kept_by_emotion"] == {"anger": 1, "happiness": 1}
    assert list(counts["kept_by_speaker"]) == ["03", "08"]
    json.dumps(counts)


def test_class_names():
    base = {"synth": {"layout": "emodb"},
            "iemocap": {"classes": ["neu", "hap", "sad", "ang"]}}
    emodb = ["anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"]
    assert class_names({**base, "corpus": "emodb"}) == emodb
    assert class_names({**base, "corpus": "synth"}) == emodb
    four = ["neutral", "happiness", "sadness", "anger"]
    assert class_names({**base, "corpus": "iemocap"}) == four
    assert class_names({**base, "corpus": "synth", "synth": {"layout": "iemocap"}}) == four
    with pytest.raises(UserError, match="data.iemocap.classes"):
        class_names({**base, "corpus": "iemocap", "iemocap": {"classes": ["neu", "joy"]}})
    with pytest.raises(UserError, match="data.corpus"):
        class_names({**base, "corpus": "ravdess"})


def test_every_file_appears_exactly_once(tmp_path):
    """Accounting over a corpus with every kind of bad file."""
    make_emodb(tmp_path)
    wav = tmp_path / "wav"
    (wav / "09a01Wa.wav").write_bytes(b"")
    (wav / "xx.wav").write_bytes(b"RIFF")
    (wav / "09a02Wa.wav").write_bytes((wav / "03a01Wa.wav").read_bytes())
    df = read_emodb(tmp_path, "emodb", 0.5)
    found = sorted(Path(p).name for p in wav.glob("*.wav"))
    assert sorted(Path(p).name for p in df["path"]) == found
    counts = corpus_counts(df)
    assert counts["kept"] + counts["dropped"] == len(found)
    assert sum(counts["dropped_by_reason"].values()) == counts["dropped"]
    write_manifest(df, tmp_path / "manifest.csv")
    back = read_manifest(tmp_path / "manifest.csv")
    pd.testing.assert_frame_equal(
        back, df.sort_values(["utt_id", "path"]).reset_index(drop=True), check_like=False
    )
