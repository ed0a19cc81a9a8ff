"""IEMOCAP reader against a generated IEMOCAP_full_release tree in the real formats."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mdser.corpora import class_names, prepare
from mdser.corpora.iemocap import LABEL_RE, parse_label_file, parse_utt_id, read_iemocap
from mdser.errors import UserError

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def label_line(utt: str, code: str, start: float = 1.0) -> str:
    return (f"[{start:.4f} - {start + 2.5:.4f}]\t{utt}\t{code}\t[2.5000, 3.0000, 2.5000]\n"
            f"C-E2:\tNeutral state;\t()\nA-E1:\tval 3; act 2; dom  2;\t()\n\n")


def write_wav(path: Path, seed: int, seconds: float = 0.8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    y = 0.2 * np.sin(2 * np.pi * rng.uniform(90, 300) * t) + 0.02 * rng.standard_normal(t.size)
    sf.write(path, y, 16000, subtype="PCM_16")


def make_iemocap(root: Path, extra: dict[str, list[tuple[str, str | None]]] | None = None) -> Path:
    """IEMOCAP_full_release with, per session, an improvised dialog holding both speakers'
    neu/hap/sad/ang turns; `extra` adds dialogs: name -> [(utt suffix, code or None)]."""
    root = root / "IEMOCAP_full_release"
    seed = 0
    for s in range(1, 6):
        ses = f"Ses{s:02d}"
        dialogs = {f"{ses}F_impro01": [(f"{g}{i:03d}", code) for i, code in
                                       enumerate(["neu", "hap", "sad", "ang"]) for g in "FM"]}
        for name, turns in (extra or {}).items():
            if name.startswith(ses):
                dialogs[name] = turns
        for dialog, turns in dialogs.items():
            lines = HEADER
            for suffix, code in turns:
                utt = f"{dialog}_{suffix}"
                seed += 1
                write_wav(root / f"Session{s}" / "sentences" / "wav" / dialog / f"{utt}.wav", seed)
                if code is not None:
                    lines += label_line(utt, code, start=seed)
            txt = root / f"Session{s}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text(lines)
    return root


DATA = {"corpus": "iemocap", "min_duration": 0.5,
        "iemocap": {"root": "", "classes": ["neu", "hap", "sad", "ang"],
                    "merge_exc_into_hap": False, "include_scripted": False}}


def data(**iemocap) -> dict:
    return {**DATA, "iemocap": {**DATA["iemocap"], **iemocap}}


def test_label_regex_matches_the_real_format():
    m = LABEL_RE.match("[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]")
    assert m and m["utt"] == "Ses01F_impro01_F000" and m["code"] == "neu"
    assert not LABEL_RE.match("[6.2901 - 8.2357] Ses01F_impro01_F000 neu [2.5000, 2.5000, 2.5000]")
    assert not LABEL_RE.match("[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu")


def test_speaker_is_the_utterance_letter_not_the_dialog_letter():
    ids = parse_utt_id("Ses01F_impro01_M003")
    assert ids["speaker"] == "Ses01M" and ids["gender"] == "m" and ids["session"] == "Ses01"
    assert ids["dialog"] == "Ses01F_impro01" and not ids["scripted"]
    assert parse_utt_id("Ses03M_impro05a_F012")["speaker"] == "Ses03F"
    assert parse_utt_id("Ses02M_impro08b_M001")["dialog"] == "Ses02M_impro08b"
    s = parse_utt_id("Ses05F_script01_1b_M020")
    assert s["scripted"] and s["speaker"] == "Ses05M" and s["dialog"] == "Ses05F_script01_1b"
    assert parse_utt_id("Ses01F_impro01") is None and parse_utt_id("foo") is None


def test_paper_subset(tmp_path):
    extra = {
        "Ses01M_impro05a": [("F000", "ang"), ("M000", "neu"), ("F001", "exc"), ("M001", "fru"),
                            ("F002", "xxx"), ("M002", None)],
        "Ses02F_script01_1b": [("F000", "neu"), ("M000", "sad")],
        "Ses03M_impro08b": [("F000", "sur"), ("M000", "hap")],
    }
    root = make_iemocap(tmp_path, extra)
    # a malformed line for an existing utterance and an unreadable one
    txt = root / "Session4" / "dialog" / "EmoEvaluation" / "Ses04F_impro01.txt"
    text = txt.read_text().replace(
        "\tSes04F_impro01_M002\tsad\t[2.5000, 3.0000, 2.5000]",
        "\tSes04F_impro01_M002\tsad\t[2.5, 3]",
    )
    txt.write_text(text + "[garbage line with no id\n")
    df = read_iemocap(root, data(root=str(root)))
    by = df.set_index("utt_id")

    def fate(utt):
        return by.loc[utt, "status"], by.loc[utt, "reason"]

    assert fate("Ses01M_impro05a_F000") == ("kept", "")
    assert by.loc["Ses01M_impro05a_F000", "speaker"] == "Ses01F"  # dialog letter is M
    assert by.loc["Ses01M_impro05a_F000", "gender"] == "f"
    assert by.loc["Ses01M_impro05a_F000", "emotion"] == "anger"
    assert fate("Ses01M_impro05a_F001") == ("dropped", "label_outside_class_set")  # exc
    assert fate("Ses01M_impro05a_M001") == ("dropped", "label_outside_class_set")  # fru
    assert by.loc["Ses01M_impro05a_M001", "emotion"] == "frustration"
    assert fate("Ses01M_impro05a_F002") == ("dropped", "label_outside_class_set")  # xxx
    assert fate("Ses01M_impro05a_M002") == ("dropped", "no_label")
    assert fate("Ses02F_script01_1b_F000") == ("dropped", "scripted")
    assert fate("Ses03M_impro08b_F000") == ("dropped", "label_outside_class_set")  # sur
    assert fate("Ses03M_impro08b_M000") == ("kept", "")
    assert fate("Ses04F_impro01_M002") == ("dropped", "malformed_label_line")
    assert any("garbage line" in w for w in df.attrs["warnings"])
    kept = df[df["status"] == "kept"]
    assert set(kept["emotion"]) == {"neutral", "happiness", "sadness", "anger"}
    assert sorted(kept["speaker"].unique()) == [f"Ses{s:02d}{g}" for s in range(1, 6) for g in "FM"]
    assert (kept["speaker"].str[:5] == kept["session"]).all()
    # accounting: every wav once; absolute paths (the corpus is read in place)
    wavs = sorted(p.as_posix() for p in root.glob("Session*/sentences/wav/*/*.wav"))
    assert sorted(df["path"]) == wavs and len(df) == len(wavs)


def test_merge_exc_and_include_scripted(tmp_path):
    extra = {"Ses01M_impro05a": [("F000", "exc")],
             "Ses02F_script01_1b": [("F000", "neu"), ("M000", "fru")]}
    root = make_iemocap(tmp_path, extra)
    df = read_iemocap(root, data(merge_exc_into_hap=True, include_scripted=True))
    by = df.set_index("utt_id")
    assert (by.loc["Ses01M_impro05a_F000", ["status", "emotion"]] == ["kept", "happiness"]).all()
    assert by.loc["Ses02F_script01_1b_F000", "status"] == "kept"
    assert by.loc["Ses02F_script01_1b_M000", "reason"] == "label_outside_class_set"


def test_parse_label_file_ignores_non_label_lines(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text(HEADER + label_line("Ses01F_impro01_F000", "neu") + "\r\n"
                   + "[1.0 - 2.0]\tSes01F_impro01_M000\tang\t[1.0000, 2.0000, 3.0000]\r\n")
    labels, malformed, warnings = parse_label_file(txt)
    assert labels == {"Ses01F_impro01_F000": "neu", "Ses01F_impro01_M000": "ang"}
    assert not malformed and not warnings


def test_missing_root_or_session_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.iemocap.root"):
        read_iemocap(tmp_path / "nowhere", DATA)
    root = make_iemocap(tmp_path)
    shutil.rmtree(root / "Session3" / "dialog")
    with pytest.raises(UserError, match="Session3"):
        read_iemocap(root, DATA)


def test_prepare_iemocap_and_class_names(tmp_path):
    root = make_iemocap(tmp_path)
    df, info = prepare(data(root=str(root)), tmp_path / "raw")
    assert class_names(data()) == ["neutral", "happiness", "sadness", "anger"]
    assert (df["status"] == "kept").all() and len(df) == 40
    assert info["warnings"] == []
    # a class with no kept utterance makes the corpus unusable
    for wav in root.glob("Session*/sentences/wav/*/*.wav"):
        if wav.stem.endswith(("F003", "M003")):  # the ang turns
            wav.write_bytes(b"")
    with pytest.raises(UserError, match="anger"):
        prepare(data(root=str(root)), tmp_path / "raw")
