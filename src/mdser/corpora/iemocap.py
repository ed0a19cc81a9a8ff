"""IEMOCAP (licensed; read in place from an `IEMOCAP_full_release` folder).

Layout: Session{1..5}/sentences/wav/<dialog>/<utt>.wav and
Session{1..5}/dialog/EmoEvaluation/<dialog>.txt with label lines like
`[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`.

The speaker of an utterance is its session plus the gender letter of the
utterance id's last part (`Ses01F_impro01_M003` -> "Ses01M"), never the letter
in the dialog name (that one says who wore the motion-capture markers).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from mdser.corpora.emodb import list_wavs
from mdser.corpora.manifest import IEMOCAP_CODES, check_audio, manifest_path, new_row
from mdser.errors import UserError

log = logging.getLogger(__name__)
SESSIONS = [f"Session{i}" for i in range(1, 6)]
NUM = r"-?\d+(?:\.\d+)?"
LABEL_RE = re.compile(
    rf"^\[(?P<start>{NUM}) - (?P<end>{NUM})\]\t(?P<utt>\S+)\t(?P<code>[a-z]{{3}})\t"
    rf"\[(?P<v>{NUM}), (?P<a>{NUM}), (?P<d>{NUM})\]$"
)
UTT_RE = re.compile(
    r"^(?P<session>Ses\d{2})(?P<dialog_letter>[FM])_(?P<part>\w+?)_(?P<letter>[FM])\d{3}$"
)
UTT_SEARCH = re.compile(r"Ses\d{2}[FM]_\w+?_[FM]\d{3}")


def parse_utt_id(utt_id: str) -> dict | None:
    """Session, speaker, gender and dialog type of an utterance id, or None.

    `Ses01F_impro05a_M012` -> session "Ses01", speaker "Ses01M", gender "m",
    dialog "Ses01F_impro05a", scripted False.
    """
    m = UTT_RE.match(utt_id)
    if not m:
        return None
    return {
        "session": m["session"],
        "speaker": m["session"] + m["letter"],
        "gender": m["letter"].lower(),
        "dialog": utt_id.rsplit("_", 1)[0],
        "scripted": m["part"].startswith("script"),
    }


def parse_label_file(path: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Labels of one EmoEvaluation file.

    Returns (labels: utt_id -> code, malformed: utt_id -> line, warnings).
    Lines not starting with "[" (header, annotator lines, blank) are ignored;
    one starting with "[" that does not match LABEL_RE is malformed: its
    utterance (if an id can be read from it) is dropped, else a warning.
    """
    labels: dict[str, str] = {}
    malformed: dict[str, str] = {}
    warnings: list[str] = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip("\r\n ")
        if not line.startswith("["):
            continue
        m = LABEL_RE.match(line)
        if m:
            utt, code = m["utt"], m["code"]
            if utt in labels and labels[utt] != code:
                malformed[utt] = line
                warnings.append(f"{path}:{lineno}: conflicting labels for {utt}")
            labels[utt] = code
            continue
        found = UTT_SEARCH.search(line)
        if found:
            malformed[found.group(0)] = line
        warnings.append(f"{path}:{lineno}: malformed label line {line!r}")
    return labels, malformed, warnings


def check_root(root: Path) -> None:
    """UserError naming the path if `root` or one of its Session folders is missing."""
    if not str(root) or not root.is_dir():
        raise UserError(
            f"data.iemocap.root: {str(root)!r} is not a folder "
            "(point it at IEMOCAP_full_release)"
        )
    for session in SESSIONS:
        for sub in ("sentences/wav", "dialog/EmoEvaluation"):
            if not (root / session / sub).is_dir():
                raise UserError(
                    f"{root / session / sub}: missing; data.iemocap.root must be an "
                    "IEMOCAP_full_release folder with Session1..Session5"
                )


def read_iemocap(root: Path, data: dict, raw_dir: Path | None = None) -> pd.DataFrame:
    """Manifest rows for every wav of Session1..5, audio checked, paper subset kept.

    `data` is the `data` params section: `data.iemocap.classes`,
    `merge_exc_into_hap` and `include_scripted` decide what is kept;
    `data.min_duration` the shortest utterance. Paths are absolute unless
    under `raw_dir`. Warnings (malformed lines, labels without audio) are
    logged and returned in `df.attrs["warnings"]`.
    """
    root = Path(root)
    check_root(root)
    cfg = data["iemocap"]
    classes = set(cfg["classes"])
    merge_exc, include_scripted = bool(cfg["merge_exc_into_hap"]), bool(cfg["include_scripted"])
    corpus = data["corpus"]

    rows: list[dict] = []
    warnings: list[str] = []
    for session in SESSIONS:
        labels: dict[str, str] = {}
        malformed: dict[str, str] = {}
        for txt in sorted((root / session / "dialog" / "EmoEvaluation").glob("*.txt")):
            if txt.name.startswith("."):
                continue
            lab, bad, warn = parse_label_file(txt)
            labels.update(lab)
            malformed.update(bad)
            warnings += warn
        wav_root = root / session / "sentences" / "wav"
        seen: set[str] = set()
        for dialog_dir in sorted(p for p in wav_root.iterdir() if p.is_dir()):
            for wav in list_wavs(dialog_dir):
                utt = wav.stem
                seen.add(utt)
                rows.append(_row(corpus, utt, manifest_path(wav, raw_dir), session,
                                 labels.get(utt), utt in malformed,
                                 classes, merge_exc, include_scripted))
        missing = sorted(set(labels) - seen)
        if missing:
            warnings.append(
                f"{root / session}: {len(missing)} labelled utterances have no wav "
                f"(e.g. {missing[:3]})"
            )
    for w in warnings:
        log.warning(w)
    if not rows:
        raise UserError(f"{root}: no .wav files under Session*/sentences/wav")
    df = check_audio(rows, raw_dir, float(data["min_duration"]))
    df.attrs["warnings"] = warnings
    return df


def _row(
    corpus: str, utt: str, path: str, session_dir: str, code: str | None, malformed: bool,
    classes: set[str], merge_exc: bool, include_scripted: bool,
) -> dict:
    """One manifest row for an IEMOCAP wav, with its drop reason if any."""
    ids = parse_utt_id(utt)
    if ids is None:
        return new_row(corpus, utt, path, reason="bad_utterance_id")
    fields = {k: ids[k] for k in ("speaker", "gender", "session")}
    if ids["session"] != f"Ses{int(session_dir.removeprefix('Session')):02d}":
        return new_row(corpus, utt, path, **fields, reason="session_mismatch")
    if malformed:
        return new_row(corpus, utt, path, **fields, reason="malformed_label_line")
    if code is None:
        return new_row(corpus, utt, path, **fields, reason="no_label")
    if merge_exc and code == "exc":
        code = "hap"
    emotion = IEMOCAP_CODES.get(code, code)
    if ids["scripted"] and not include_scripted:
        return new_row(corpus, utt, path, **fields, emotion=emotion, reason="scripted")
    if code not in classes:
        return new_row(corpus, utt, path, **fields, emotion=emotion,
                       reason="label_outside_class_set")
    return new_row(corpus, utt, path, **fields, emotion=emotion)
