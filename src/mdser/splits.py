"""Speaker-independent folds (paper section "Speaker-independent experiment").

One fold per speaker: that speaker is the test set, one other speaker the
validation set, and the training set is every speaker outside the test
speaker's session. IEMOCAP: the validation speaker is the other actor of the
test speaker's session, training is the other four sessions. Corpora without
sessions (EMODB, the built-in corpus): the validation speaker is the next
speaker in sorted order (cyclically), training is the remaining eight. A manifest
where some speakers have a session and others do not is refused, not folded by the
session-less rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.errors import UserError


def speaker_folds(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """Folds over the kept utterances' speakers, in sorted speaker order."""
    kept = manifest[manifest["status"] == "kept"]
    session_of = (
        kept.groupby("speaker")["session"].first().fillna("").astype(str).to_dict()
    )
    speakers = sorted(session_of)
    if len(speakers) < 3:
        raise UserError(
            f"the manifest keeps {len(speakers)} speaker(s); speaker-independent folds "
            "need at least 3 (test, validation, training)"
        )
    without = [s for s in speakers if not session_of[s]]
    if without and len(without) < len(speakers):
        raise UserError(
            f"speaker(s) {without} have no session but the other "
            f"{len(speakers) - len(without)} speakers have one; session-based (IEMOCAP) folds "
            "need every speaker's session: check the manifest's `session` column"
        )
    has_sessions = not without
    folds = []
    for k, test in enumerate(speakers):
        if has_sessions:
            partners = [s for s in speakers if s != test and session_of[s] == session_of[test]]
            if len(partners) != 1:
                raise UserError(
                    f"session {session_of[test]!r} has {len(partners) + 1} speakers; "
                    "IEMOCAP-style folds need exactly two per session"
                )
            val = partners[0]
            train = [s for s in speakers if session_of[s] != session_of[test]]
        else:
            val = speakers[(k + 1) % len(speakers)]
            train = [s for s in speakers if s not in (test, val)]
        folds.append({"fold": k, "test": test, "val": val, "train": train})
    return folds


def check_folds(folds: list[dict[str, Any]]) -> None:
    """No speaker in two roles of one fold; raise otherwise."""
    for f in folds:
        roles = [{f["test"]}, {f["val"]}, set(f["train"])]
        if len(set().union(*roles)) != sum(len(r) for r in roles):
            raise UserError(f"fold {f['fold']}: a speaker appears in two roles: {f}")


def write_folds(
    folds: list[dict[str, Any]], manifest_sha256: str, path: Path, classes: list[str]
) -> None:
    check_folds(folds)
    doc = {"manifest_sha256": manifest_sha256, "classes": classes, "folds": folds}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def read_folds(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: missing; run `dvc repro split`")
    doc = json.loads(path.read_text())
    check_folds(doc["folds"])
    return doc


def fold_members(index: pd.DataFrame, fold: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The feature-store rows of each role of a fold."""
    return {
        "train": index[index["speaker"].isin(fold["train"])],
        "val": index[index["speaker"] == fold["val"]],
        "test": index[index["speaker"] == fold["test"]],
    }


def encode_labels(rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Class indices (into `classes`) of the rows' emotions; an unknown emotion is an error."""
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["emotion"]) - set(lookup))
    if unknown:
        raise UserError(f"emotions {unknown} are not in the class set {classes}")
    return rows["emotion"].map(lookup).to_numpy(np.int64)
