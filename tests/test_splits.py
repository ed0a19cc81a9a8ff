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


def test_some_speakers_without_a_session_is_a_clear_error_naming_them():
    """Not a silent fall-back to the session-less (EMODB) rule."""
    speakers = [f"Ses0{s}{g}" for s in range(1, 6) for g in "FM"]
    sessions = [s[:5] for s in speakers]
    sessions[speakers.index("Ses02M")] = ""
    sessions[speakers.index("Ses05F")] = ""
    with pytest.raises(UserError, match=r"\['Ses02M', 'Ses05F'\] have no session") as err:
        speaker_folds(manifest(speakers * 2, sessions * 2))
    assert "Ses01F" not in str(err.value)  # only the speakers whose session is missing


def test_a_missing_session_counts_also_when_read_back_as_nan():
    speakers = ["a", "b", "c", "d"]
    m = manifest(speakers, ["S1", "S1", float("nan"), "S2"])
    with pytest.raises(UserError, match=r"\['c'\] have no session"):
        speaker_folds(m)


def test_no_speaker_with_a_session_keeps_the_emodb_rule():
    speakers = ["a", "b", "c", "d"]
    for blank in ("", float("nan")):
        folds = speaker_folds(manifest(speakers, [blank] * 4))
        assert [(f["test"], f["val"], f["train"]) for f in folds] == [
            ("a", "b", ["c", "d"]), ("b", "c", ["a", "d"]), ("c", "d", ["a", "b"]),
            ("d", "a", ["b", "c"])]
