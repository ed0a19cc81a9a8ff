"""Speaker-independent folds: no speaker in two roles, IEMOCAP session pairing."""

import pandas as pd
import pytest

from mdser.errors import UserError
from mdser.splits import check_folds, speaker_folds


def manifest(speakers, sessions=None):
    sessions = sessions or [""] * len(speakers)
    return pd.DataFrame({"speaker": speakers, "session": sessions, "status": "kept"})


def test_every_speaker_tested_once_and_never_in_two_roles():
    m = manifest([f"{i:02d}" for i in range(10)] * 3)
    folds = speaker_folds(m)
    assert [f["test"] for f in folds] == sorted(set(m["speaker"]))
    for f in folds:
        assert f["test"] != f["val"]
        assert f["test"] not in f["train"] and f["val"] not in f["train"]
        assert len(f["train"]) == 8
    check_folds(folds)


def test_iemocap_validates_on_the_session_partner_and_trains_on_other_sessions():
    speakers = [f"Ses0{s}{g}" for s in range(1, 6) for g in "FM"]
    m = manifest(speakers, [s[:5] for s in speakers])
    folds = {f["test"]: f for f in speaker_folds(m)}
    f = folds["Ses03M"]
    assert f["val"] == "Ses03F"
    assert sorted(f["train"]) == sorted(s for s in speakers if not s.startswith("Ses03"))


def test_dropped_utterances_do_not_make_speakers():
    m = manifest(["a", "b", "c", "d"])
    m.loc[3, "status"] = "dropped"
    assert [f["test"] for f in speaker_folds(m)] == ["a", "b", "c"]


def test_too_few_speakers_is_a_clear_error():
    with pytest.raises(UserError, match="at least 3"):
        speaker_folds(manifest(["a", "b"]))


def test_a_speaker_in_two_roles_is_refused():
    with pytest.raises(UserError, match="two roles"):
        check_folds([{"fold": 0, "test": "a", "val": "b", "train": ["a", "c"]}])
